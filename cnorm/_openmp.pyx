# cython: language_level=3
"""OpenMP facts and the thread-count control shared by every CPU kernel.

Compiled with or without OpenMP: without it every function still works and
reports a serial build.
"""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CNORM_HAVE_OPENMP 1
    static int cnorm_omp_max_threads(void) { return omp_get_max_threads(); }
    static void cnorm_omp_set_threads(int n) { omp_set_num_threads(n); }
    static int cnorm_omp_version(void) { return _OPENMP; }
    #else
    #define CNORM_HAVE_OPENMP 0
    static int cnorm_omp_max_threads(void) { return 1; }
    static void cnorm_omp_set_threads(int n) { (void)n; }
    static int cnorm_omp_version(void) { return 0; }
    #endif
    #ifndef CNORM_OPENMP_FLAGS
    #define CNORM_OPENMP_FLAGS ""
    #endif
    """
    int CNORM_HAVE_OPENMP
    const char* CNORM_OPENMP_FLAGS
    int cnorm_omp_max_threads() nogil
    void cnorm_omp_set_threads(int n) nogil
    int cnorm_omp_version() nogil

# The process-wide cap set by set_num_threads (0: none). omp_set_num_threads
# only changes the calling thread's ICV; this cap also reaches kernels called
# from other Python threads.
cdef int _user_cap = 0


def openmp_enabled():
    """Return True when the extension was compiled with OpenMP."""
    return bool(CNORM_HAVE_OPENMP)


def openmp_version():
    """Return the ``_OPENMP`` date macro (e.g. 201511), or 0 for a serial build."""
    return cnorm_omp_version()


def openmp_flags():
    """Return the compiler flags the build used to enable OpenMP ('' if none)."""
    return CNORM_OPENMP_FLAGS.decode()


def get_num_threads():
    """Return the number of threads the next kernel call will use.

    This is ``omp_get_max_threads()`` read now (so a ``threadpoolctl`` limit
    applies), capped by :func:`set_num_threads`.
    """
    cdef int n = cnorm_omp_max_threads()
    if _user_cap > 0 and _user_cap < n:
        n = _user_cap
    return n if n > 0 else 1


def set_num_threads(int n):
    """Set the number of threads cnorm's kernels use.

    Parameters
    ----------
    n : int
        A positive thread count.
    """
    global _user_cap
    if n < 1:
        raise ValueError(f"n: expected a positive thread count, got {n}")
    _user_cap = n
    cnorm_omp_set_threads(n)

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

# The process-wide count set by set_num_threads (0: none). omp_set_num_threads
# only changes the calling thread's ICV (a thread started later begins with
# the default), so this count, not the ICV, is what reaches kernels called
# from other Python threads.
cdef int _user_cap = 0
# The OpenMP default every thread starts with (OMP_NUM_THREADS, else the
# number of CPUs): a calling thread whose ICV differs has a limit set in it
# (threadpoolctl's threadpool_limits, or omp_set_num_threads by some library).
cdef int _initial_icv = cnorm_omp_max_threads()


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
    """Return the number of threads the next kernel call from this thread will use.

    Without :func:`set_num_threads`: ``omp_get_max_threads()`` read now in the
    calling thread (``OMP_NUM_THREADS``, else the CPU count; a ``threadpoolctl``
    limit in force in this thread applies). After ``set_num_threads(n)``: n,
    in every thread, except where the calling thread has a lower limit set in
    it (an ICV that differs from the process default and is below n). A limit
    equal to the default cannot be told from no limit, so it does not lower n.
    """
    cdef int icv = cnorm_omp_max_threads()
    cdef int n = icv
    if _user_cap > 0:
        n = _user_cap
        if icv != _initial_icv and icv < n:
            n = icv
    return n if n > 0 else 1


def set_num_threads(int n):
    """Set the number of threads cnorm's kernels use, in every Python thread.

    Parameters
    ----------
    n : int
        A positive thread count.
    """
    global _user_cap
    if n < 1:
        raise ValueError(f"n: expected a positive thread count, got {n}")
    _user_cap = n
    cnorm_omp_set_threads(n)  # this thread's ICV too, for OpenMP code outside cnorm that reads it

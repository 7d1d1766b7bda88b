# ------------------------------------------------------- Python wrappers --
# Every wrapper checks what the kernels would otherwise misread (type,
# contiguity, length, dtype, writability) in C, then dispatches on the data
# dtype: float32 and the half types use float32 parameters and statistics,
# float64 uses float64.

cn_native_init()

#: The CPU level these kernels were compiled for ("baseline", "avx2", "avx512").
LEVEL = cn_level_name().decode()
#: Whether a*b + c rounds once in the vector code (FMA), and whether bfloat16
#: stores use the AVX512-BF16 conversion instructions (found on this CPU).
FMA = bool(cn_level_has_fma())
HW_BF16 = bool(cn_level_hw_bf16())

try:
    import ml_dtypes as _ml_dtypes

    _BF16_NUM = np.dtype(_ml_dtypes.bfloat16).num
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _BF16_NUM = -1

cdef int F32 = cnp.NPY_FLOAT32
cdef int F64 = cnp.NPY_FLOAT64
cdef int F16 = cnp.NPY_FLOAT16
cdef int BF16 = _BF16_NUM

_EMPTY = np.empty(1)  # stands in for scratch a path does not use


cdef inline void* ptr(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void* optr(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef str _dtname(int dt):
    return str(np.dtype(_ml_dtypes.bfloat16) if dt == BF16 and BF16 >= 0 else cnp.PyArray_DescrFromType(dt))


cdef int _check(x, int dt, Py_ssize_t size, str name) except -1:
    """Refuse arrays the kernels would read out of bounds or misread."""
    if not isinstance(x, cnp.ndarray):  # a C type check (np.ndarray would be two lookups)
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    cdef cnp.ndarray a = x
    if not cnp.PyArray_IS_C_CONTIGUOUS(a) or cnp.PyArray_TYPE(a) != dt or cnp.PyArray_SIZE(a) != size:
        raise ValueError(f"{name}: expected a C-contiguous {_dtname(dt)} array of {size} values, "
                         f"got shape {x.shape}, dtype {x.dtype}")
    return 0


cdef object _in(x, int dt, Py_ssize_t size, str name):
    """Check an input; return it, or an aligned copy in native byte order.

    The kernels load values with aligned, native-order loads: a byte-swapped
    array (``>f4`` on x86) would be misread, and an unaligned one is undefined
    behaviour in C. Both are rare, so they cost one copy rather than a slower
    kernel."""
    _check(x, dt, size, name)
    if cnp.PyArray_ISBEHAVED_RO(<cnp.ndarray>x):
        return x
    return np.array(x, dtype=x.dtype.newbyteorder("="), order="C", copy=True)


cdef int _out(x, int dt, Py_ssize_t size, str name) except -1:
    """Check an output the kernels write: as _check, writable, aligned, native byte order."""
    _check(x, dt, size, name)
    cdef cnp.ndarray a = x
    if not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: output array is read-only")
    if not cnp.PyArray_ISBEHAVED(a):
        raise ValueError(f"{name}: expected an aligned output array in native byte order, "
                         f"got dtype {x.dtype} (aligned: {bool(cnp.PyArray_ISALIGNED(a))})")
    return 0


# Team size of the latest call (any thread); lets tests check that limits hold.
cdef int _last_threads = 0


def last_threads():
    """Return the thread count the most recent kernel call ran with."""
    return _last_threads


cdef int _nthreads(Py_ssize_t work, Py_ssize_t units, int nt, bint record=True) noexcept:
    global _last_threads
    cdef int t = 1
    if work >= SERIAL_ELEMS and units >= 2:
        t = <int>min(<Py_ssize_t>max(nt, 1), units)
    if record:
        _last_threads = t
    return t


cdef int _dtype_num(x) except -1:
    """The data dtype's number; TypeError for dtypes without kernels."""
    if not isinstance(x, cnp.ndarray):
        raise TypeError(f"x: expected a numpy.ndarray, got {type(x).__name__}")
    cdef int dt = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if dt != F32 and dt != F64 and dt != F16 and dt != BF16:
        raise TypeError(f"x: the cython kernels take float32 or float64 (or float16, bfloat16), got {x.dtype}")
    return dt


cdef inline void _stream(Py_ssize_t out_bytes, const void* out=NULL, const void* a=NULL,
                         const void* b=NULL) noexcept:
    """Choose streaming stores for this call's output (a hint: any value is correct).

    Not when the output is an input itself (out=x, out=dy): its lines were just
    read into the cache, where a plain store finds them; a streaming store would
    first have to evict them."""
    cn_set_nt_store(1 if out_bytes >= NT_BYTES and (out == NULL or (out != a and out != b)) else 0)


cdef inline int _pnum(int dt) noexcept:
    """Parameter/statistics dtype number for data dtype ``dt``."""
    return F64 if dt == F64 else F32


cdef inline cnp.ndarray _empty1(Py_ssize_t n, int dt):
    cdef cnp.npy_intp d = n
    return cnp.PyArray_EMPTY(1, &d, dt, 0)


# Results of ALIGN_MIN bytes or more start on a 64-byte boundary (a cache line,
# an AVX-512 vector). NumPy's arrays start wherever malloc puts them: 16 bytes
# past a line in glibc's heap, 16 past a page when it maps them (48 and 16
# modulo 64 at 0.4 and 2 MB here), so every vector load or store of such an
# array straddles two lines. On a LayerNorm (2048, 256) float32, aligned input
# and output made cnorm's forward 14% and backward 10% faster, NumPy's add 9%,
# and PyTorch's in-place add (autograd's gradient accumulation into x.grad) of
# a tensor over such an array took 31 us instead of 66. Below ALIGN_MIN the
# kernel's time is near the microsecond the alignment costs.
cdef Py_ssize_t ALIGN_MIN = 1 << 16


cdef cnp.ndarray _out_like(cnp.ndarray x):
    """An uninitialized C-contiguous array of x's shape and dtype; 64-byte aligned
    from ALIGN_MIN bytes up (a view into a buffer 64 bytes longer)."""
    cdef Py_ssize_t nb = cnp.PyArray_NBYTES(x)
    if nb < ALIGN_MIN:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)
    cdef cnp.npy_intp n = nb + 64
    cdef cnp.ndarray buf = cnp.PyArray_EMPTY(1, &n, cnp.NPY_UINT8, 0)
    cdef Py_ssize_t off = (64 - <Py_ssize_t>(<size_t>cnp.PyArray_DATA(buf) & 63)) & 63
    return buf[off:off + nb].view((<object>x).dtype).reshape((<object>x).shape)


def empty_like(cnp.ndarray x):
    """A new array for a result shaped like the C-contiguous kernel view ``x`` (see _out_like)."""
    return _out_like(x)


# Scratch a Python thread keeps between calls. Under glibc's default policy a
# freed block of a few MiB at the top of the heap is returned to the system
# when its mmap threshold stayed low (it rises only with blocks of at most
# 32 MiB freed: a process whose outputs are larger never raises it), so per-
# call partials of that size were fresh, page-faulted memory every call:
# LayerNorm backward (2048, 4096) float32 with out= paid 992 page faults per
# call for its 4 MiB of dweight/dbias partials. Per Python thread (each call
# holds its thread's buffer until it returns; calls of one thread never
# overlap), and only sizes worth it: small blocks stay in the heap anyway,
# huge ones are not kept.
import threading as _threading

_workspace = _threading.local()
cdef Py_ssize_t WS_MIN = 1 << 14  # doubles (128 KiB): glibc's initial mmap threshold
cdef Py_ssize_t WS_MAX = 1 << 23  # doubles (64 MiB)


cdef cnp.ndarray _scratch64(Py_ssize_t n):
    """n doubles of scratch (uninitialized), this thread's kept buffer when n is in
    [WS_MIN, WS_MAX]; valid until the thread's next call."""
    if n < WS_MIN or n > WS_MAX:
        return _empty1(n, F64)
    cdef object buf = getattr(_workspace, "buf", None)
    if buf is None or cnp.PyArray_SIZE(<cnp.ndarray>buf) < n:
        buf = _empty1(n, F64)
        _workspace.buf = buf
    return <cnp.ndarray>buf


def cf_geometry(Py_ssize_t N, Py_ssize_t S):
    """Return (rb, sp, nsp, nblk): row-block size, piece length, pieces per row, blocks per channel."""
    if S <= BLK:
        rb = max(1, BLK // S)
        return rb, S, 1, (N + rb - 1) // rb
    nsp = (S + BLK - 1) // BLK
    return 1, BLK, nsp, N * nsp


def cl_geometry(Py_ssize_t R, Py_ssize_t C):
    """Return (rb, nblk) of a channels-last cross-sample problem of R rows."""
    rb = max((R + MAXBLK - 1) // MAXBLK, max(1, BLK // C), 1)
    return rb, (R + rb - 1) // rb


cdef inline Py_ssize_t _sample_block(Py_ssize_t N, Py_ssize_t per_sample) noexcept:
    """Samples per block of the per-sample dweight/dbias partials: at most MAXBLK
    blocks, each of at least SERIAL_ELEMS values (a block of a few short rows
    would cost its C-long partial rows more than its work). Shape-determined."""
    cdef Py_ssize_t sbs = (N + MAXBLK - 1) // MAXBLK
    cdef Py_ssize_t least = (SERIAL_ELEMS + per_sample - 1) // per_sample
    return max(1, min(N, max(sbs, least)))


cdef int _check_act(int act) except -1:
    if act != ACT_NONE and act != ACT_RELU and act != ACT_SILU:
        raise ValueError(f"act: expected an activation code of {ACTIVATIONS} or 0, got {act}")
    return 0


cdef cnp.ndarray _cross_act_consts(mean, rstd, weight, bias, Py_ssize_t C, int pt, bint frozen):
    """(mean_hi[C], a[C], b[C]) with z = (x - mean_hi)·a + b computed exactly as the
    forward computed it before its activation: with batch statistics (fwd_consts
    with an activation) mean_hi = mean, a = weight·rstd rounded to the statistics
    type, b = bias; frozen (eval: the affine kernel's x·scale + shift, fold_frozen's
    constants) mean_hi = 0, a = scale, b = shift recomputed as fold_frozen did."""
    cdef cnp.ndarray ak = _empty1(3 * C, pt)
    cdef const void* pm = ptr(mean)
    cdef const void* pr = ptr(rstd)
    cdef const void* pw = ptr(weight)
    cdef const void* pb = ptr(bias)
    cdef void* pk = ptr(ak)
    cdef Py_ssize_t c
    cdef double m, sc
    for c in range(C):
        m = _ld64(pm, pt, c)
        sc = _rnd(pt, _ld64(pw, pt, c) * _ld64(pr, pt, c))
        _st64(pk, pt, C + c, sc)
        if frozen:
            _st64(pk, pt, c, 0.0)
            _st64(pk, pt, 2 * C + c, _ld64(pb, pt, c) - m * sc)
        else:
            _st64(pk, pt, c, m)
            _st64(pk, pt, 2 * C + c, _ld64(pb, pt, c))
    return ak


cdef object _act_prologue(dy, x, dx, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                          mean, rstd, weight, bias, ak, int act, int dt, int nt):
    """g = dy·act'(z) over the whole tensor (act_grad_k), for the backward paths whose
    unit of work is not cache-resident; returns g, the plain kernel's dy.

    g goes into dx (which may be dy itself: every backward kernel reads dy[i] and
    x[i] before it writes dx[i]), or into a new array when there is no dx or dx is
    x itself (x is still to be read). ak: _cross_act_consts for G == 0."""
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    cdef Py_ssize_t units = N * S if cl else (N * G if S == 1 and G > 0 else N * C)
    cdef int t = _nthreads(size, units, nt, False)
    if dx is None or ptr(dx) == ptr(x):
        g = _out_like(x)
    else:
        g = dx
    cdef cnp.ndarray kxs = _empty1(3 * (C + 16) * t, pt)
    cdef void* pdy = ptr(dy)
    cdef void* px = ptr(x)
    cdef void* pg = ptr(g)
    cdef void* pm = ptr(mean)
    cdef void* pr = ptr(rstd)
    cdef void* pw = ptr(weight)
    cdef void* pb = ptr(bias)
    cdef void* pa = ptr(ak)
    cdef void* pk = ptr(kxs)
    _stream(size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x), pg, pdy, px)
    with nogil:
        if dt == F32:
            act_grad_k(<float*>pdy, <float*>px, <float*>pg, N, C, S, G, cl, <float*>pm, <float*>pr,
                       <float*>pw, <float*>pb, <float*>pa, act, <float*>pk, t)
        elif dt == F64:
            act_grad_k(<double*>pdy, <double*>px, <double*>pg, N, C, S, G, cl, <double*>pm, <double*>pr,
                       <double*>pw, <double*>pb, <double*>pa, act, <double*>pk, t)
        elif dt == F16:
            act_grad_k(<cn_f16*>pdy, <cn_f16*>px, <cn_f16*>pg, N, C, S, G, cl, <float*>pm, <float*>pr,
                       <float*>pw, <float*>pb, <float*>pa, act, <float*>pk, t)
        else:
            act_grad_k(<cn_bf16*>pdy, <cn_bf16*>px, <cn_bf16*>pg, N, C, S, G, cl, <float*>pm, <float*>pr,
                       <float*>pw, <float*>pb, <float*>pa, act, <float*>pk, t)
    return g


def forward_train(x, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                  weight, bias, double eps, int nt, y=None, bint rms=False, int act=ACT_NONE, residual=None, h=None):
    """Training forward: ``(y, mean, var, rstd)``, y new unless given (it may be x itself).

    ``G == 0``: cross-sample (statistics shape ``(C,)``), else per-sample with
    G groups (``(N, G)``). ``rms``: RMSNorm statistics (mean 0, var the mean
    square), per-sample rows (S == 1) only. ``act``: an activation code
    (ACTIVATIONS) applied in the sweep that stores y; the normalization then
    uses the constants backward recomputes (weight·rstd as rounded, bias; no
    fold of the mean's rounding). ``residual`` (rows only): the fused add,
    ``h = x + residual`` written into ``h`` (new unless given; it may be x or
    residual itself) and normalized: returns ``(y, h, mean, var, rstd)``.
    Other arguments as in :func:`cross_forward`.
    """
    cdef int dt = _dtype_num(x)
    cdef int pt = _pnum(dt)
    cdef cnp.npy_intp sd[2]
    sd[0] = C if G == 0 else N
    sd[1] = G
    if y is None:
        y = _out_like(x)
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(1 if G == 0 else 2, sd, pt, 0)
    cdef cnp.ndarray var = cnp.PyArray_EMPTY(1 if G == 0 else 2, sd, pt, 0)
    cdef cnp.ndarray rstd = cnp.PyArray_EMPTY(1 if G == 0 else 2, sd, pt, 0)
    if G == 0:
        _cross_forward(x, y, cl, N, C, S, weight, bias, mean, var, rstd, eps, nt, act)
    else:
        if residual is not None:
            if h is None:
                h = _out_like(x)
            _group_forward(x, y, cl, N, C, S, G, weight, bias, mean, var, rstd, eps, nt, rms, act, residual, h)
            return y, h, mean, var, rstd
        _group_forward(x, y, cl, N, C, S, G, weight, bias, mean, var, rstd, eps, nt, rms, act)
    return y, mean, var, rstd


def cross_forward(x, y, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, weight, bias,
                  mean, var, rstd, double eps, int nt):
    """Cross-sample (BatchNorm) training forward; ``y=None`` computes statistics only.

    Parameters
    ----------
    x, y : ndarray
        Input and output, C-contiguous ``(N, C, S)`` or (``cl``) ``(N, S, C)``;
        float32, float64, float16 or bfloat16.
    cl : bool
        Channels-last layout.
    N, C, S : int
        Problem sizes.
    weight, bias : ndarray
        Length-C affine parameters in the statistics dtype (float64 for
        float64 data, else float32).
    mean, var, rstd : ndarray
        Length-C outputs in the statistics dtype.
    eps : float
        Added to the variance.
    nt : int
        Most threads to use.
    """
    _cross_forward(x, y, cl, N, C, S, weight, bias, mean, var, rstd, eps, nt)


cdef int _cross_forward(x, y, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, weight, bias,
                        mean, var, rstd, double eps, int nt, int act=ACT_NONE) except -1:
    cdef int dt = _dtype_num(x)
    _check_act(act)
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    x = _in(x, dt, size, "x")
    if y is not None:
        _out(y, dt, size, "y")
    weight = _in(weight, pt, C, "weight")
    bias = _in(bias, pt, C, "bias")
    _out(mean, pt, C, "mean")
    _out(var, pt, C, "var")
    _out(rstd, pt, C, "rstd")
    cdef cnp.ndarray part, kk = _empty1(3 * C + 3 * (C + 16), pt)
    cdef Py_ssize_t rb, sp = 0, nsp = 0, nblk
    cdef bint fused = False
    cdef int t
    cl = cl or S == 1  # (N, C, 1) channels-first is (N, 1, C) channels-last
    cdef cnp.ndarray fscr = _EMPTY
    if cl:
        rb, nblk = cl_geometry(N * S, C)
        part = _scratch64(2 * nblk * C)
        t = _nthreads(size, nblk, nt)
        fscr = _empty1(3 * C * t, F64)
    else:
        rb, sp, nsp, nblk = cf_geometry(N, S)
        t = _nthreads(size, C * nblk, nt)
        # One thread per channel keeps the channel in L2 between its passes
        # when there are enough channels to share and a channel fits.
        fused = (t == 1 or C >= 4 * t) and N * S * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x) <= FUSE_BYTES
        part = _scratch64(0 if fused else 3 * C * nblk)
    cdef void* px = ptr(x)
    cdef void* py = optr(y)
    cdef void* pw = ptr(weight)
    cdef void* pb = ptr(bias)
    cdef void* pm = ptr(mean)
    cdef void* pv = ptr(var)
    cdef void* pr = ptr(rstd)
    cdef void* pk = ptr(kk)
    cdef double* pp = <double*>ptr(part)
    cdef double* pfs = <double*>ptr(fscr)
    _stream(0 if y is None else size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x), py, px)
    with nogil:
        if cl:
            if dt == F32:
                cl_cross_fwd(<float*>px, <float*>py, N * S, C, rb, nblk, pp, eps, <float*>pw,
                             <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, pfs, t, act)
            elif dt == F64:
                cl_cross_fwd(<double*>px, <double*>py, N * S, C, rb, nblk, pp, eps, <double*>pw,
                             <double*>pb, <double*>pm, <double*>pv, <double*>pr, <double*>pk, pfs, t, act)
            elif dt == F16:
                cl_cross_fwd(<cn_f16*>px, <cn_f16*>py, N * S, C, rb, nblk, pp, eps, <float*>pw,
                             <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, pfs, t, act)
            else:
                cl_cross_fwd(<cn_bf16*>px, <cn_bf16*>py, N * S, C, rb, nblk, pp, eps, <float*>pw,
                             <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, pfs, t, act)
        else:
            if dt == F32:
                cf_cross_fwd(<float*>px, <float*>py, N, C, S, rb, sp, nsp, nblk, fused, pp, eps,
                             <float*>pw, <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, t, act)
            elif dt == F64:
                cf_cross_fwd(<double*>px, <double*>py, N, C, S, rb, sp, nsp, nblk, fused, pp, eps,
                             <double*>pw, <double*>pb, <double*>pm, <double*>pv, <double*>pr,
                             <double*>pk, t, act)
            elif dt == F16:
                cf_cross_fwd(<cn_f16*>px, <cn_f16*>py, N, C, S, rb, sp, nsp, nblk, fused, pp, eps,
                             <float*>pw, <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, t, act)
            else:
                cf_cross_fwd(<cn_bf16*>px, <cn_bf16*>py, N, C, S, rb, sp, nsp, nblk, fused, pp, eps,
                             <float*>pw, <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, t, act)
    return 0


def cross_backward(dy, x, dx, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, mean, rstd, weight,
                   out_a, out_b, int mode, int nt, mean_dy=None, mean_dy_xhat=None, int act=ACT_NONE,
                   bias=None):
    """Cross-sample backward in one of four modes.

    ``TRAIN``: dx through batch statistics, ``out_a = Σ dy·xhat``,
    ``out_b = Σ dy``. ``EVAL``: ``dx = dy·weight·rstd`` in the same sweep as
    the sums. ``SUMS``: the sums only (``dx`` is None). ``APPLY``:
    ``dx = weight·rstd·(dy - mean_dy - xhat·mean_dy_xhat)`` only (``out_a``,
    ``out_b`` are None). Other arguments as in :func:`cross_forward`.

    ``act`` (TRAIN and EVAL): through the activation the forward applied, with
    g = dy·act'(z) in place of dy; z is recomputed from x, mean, rstd, weight
    and ``bias`` as that forward computed it (forward_train with act; EVAL:
    affine with fold_frozen's scale and shift). Channels-first channels that
    take the fused path compute g per channel into per-thread scratch (no
    extra memory traffic); the other paths take a whole-tensor prologue
    (_act_prologue).
    """
    cdef int dt = _dtype_num(x)
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    dy = _in(dy, dt, size, "dy")
    x = _in(x, dt, size, "x")
    if mode != MODE_SUMS:
        _out(dx, dt, size, "dx")
    mean = _in(mean, pt, C, "mean")
    rstd = _in(rstd, pt, C, "rstd")
    weight = _in(weight, pt, C, "weight")
    if mode == MODE_APPLY:
        mean_dy = _in(mean_dy, pt, C, "mean_dy")
        mean_dy_xhat = _in(mean_dy_xhat, pt, C, "mean_dy_xhat")
        out_a = out_b = _empty1(C, pt)  # not written
    else:
        _out(out_a, pt, C, "out_a")
        _out(out_b, pt, C, "out_b")
        mean_dy = mean_dy_xhat = mean  # not read
    _check_act(act)
    cdef cnp.ndarray ak = _EMPTY
    if act != ACT_NONE:
        if mode != MODE_TRAIN and mode != MODE_EVAL:
            raise ValueError("act: an activation's gradient is for the TRAIN and EVAL modes")
        bias = _in(bias, pt, C, "bias")
        ak = _cross_act_consts(mean, rstd, weight, bias, C, pt, mode == MODE_EVAL)
    cdef cnp.ndarray part, mud = _empty1(C, F64), kk = _empty1(4 * C + 4 * (C + 16), pt)
    cdef Py_ssize_t rb, sp = 0, nsp = 0, nblk
    cdef bint fused = False
    cdef int t
    cl = cl or S == 1
    if cl:
        rb, nblk = cl_geometry(N * S, C)
        part = _scratch64(3 * nblk * C)
        t = _nthreads(size, nblk, nt)
    else:
        rb, sp, nsp, nblk = cf_geometry(N, S)
        t = _nthreads(size, C * nblk, nt)
        fused = (t == 1 or C >= 4 * t) and 2 * N * S * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x) <= FUSE_BYTES
        part = _scratch64(0 if fused else 3 * C * nblk)
    # an activation: g per channel into scratch on the fused path (gstride values a
    # thread, whole lines), else g over the whole tensor first
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(<cnp.ndarray>x)
    cdef Py_ssize_t gstride = 0
    if act != ACT_NONE:
        if fused and not cl:
            gstride = (N * S * item + 63) // 64 * 64 // item
            part = _scratch64(t * gstride * item // 8)
        else:
            dy = _act_prologue(dy, x, dx, cl, N, C, S, 0, mean, rstd, weight, bias, ak, act, dt, nt)
            act = ACT_NONE
    cdef void* pg = ptr(dy)
    cdef void* px = ptr(x)
    cdef void* pdx = optr(dx)
    cdef void* pm = ptr(mean)
    cdef void* pr = ptr(rstd)
    cdef void* pw = ptr(weight)
    cdef void* pmd = ptr(mean_dy)
    cdef void* pmdx = ptr(mean_dy_xhat)
    cdef void* pa = ptr(out_a)
    cdef void* pb = ptr(out_b)
    cdef void* pk = ptr(kk)
    cdef double* pp = <double*>ptr(part)
    cdef double* pmu = <double*>ptr(mud)
    cdef void* pak = ptr(ak)
    _stream(0 if dx is None else size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x), pdx, pg, px)
    with nogil:
        if cl:
            if dt == F32:
                cl_cross_bwd(<float*>pg, <float*>px, <float*>pdx, N * S, C, rb, nblk, pp, mode,
                             <float*>pm, <float*>pr, <float*>pw, <float*>pmd, <float*>pmdx,
                             <float*>pa, <float*>pb, <float*>pk, pmu, t)
            elif dt == F64:
                cl_cross_bwd(<double*>pg, <double*>px, <double*>pdx, N * S, C, rb, nblk, pp, mode,
                             <double*>pm, <double*>pr, <double*>pw, <double*>pmd, <double*>pmdx,
                             <double*>pa, <double*>pb, <double*>pk, pmu, t)
            elif dt == F16:
                cl_cross_bwd(<cn_f16*>pg, <cn_f16*>px, <cn_f16*>pdx, N * S, C, rb, nblk, pp, mode,
                             <float*>pm, <float*>pr, <float*>pw, <float*>pmd, <float*>pmdx,
                             <float*>pa, <float*>pb, <float*>pk, pmu, t)
            else:
                cl_cross_bwd(<cn_bf16*>pg, <cn_bf16*>px, <cn_bf16*>pdx, N * S, C, rb, nblk, pp, mode,
                             <float*>pm, <float*>pr, <float*>pw, <float*>pmd, <float*>pmdx,
                             <float*>pa, <float*>pb, <float*>pk, pmu, t)
        else:
            if dt == F32:
                cf_cross_bwd(<float*>pg, <float*>px, <float*>pdx, N, C, S, rb, sp, nsp, nblk, fused,
                             pp, mode, <float*>pm, <float*>pr, <float*>pw, <float*>pmd,
                             <float*>pmdx, <float*>pa, <float*>pb, <float*>pk, t, act, <float*>pak,
                             <float*>pp, gstride)
            elif dt == F64:
                cf_cross_bwd(<double*>pg, <double*>px, <double*>pdx, N, C, S, rb, sp, nsp, nblk,
                             fused, pp, mode, <double*>pm, <double*>pr, <double*>pw, <double*>pmd,
                             <double*>pmdx, <double*>pa, <double*>pb, <double*>pk, t, act, <double*>pak,
                             <double*>pp, gstride)
            elif dt == F16:
                cf_cross_bwd(<cn_f16*>pg, <cn_f16*>px, <cn_f16*>pdx, N, C, S, rb, sp, nsp, nblk, fused,
                             pp, mode, <float*>pm, <float*>pr, <float*>pw, <float*>pmd,
                             <float*>pmdx, <float*>pa, <float*>pb, <float*>pk, t, act, <float*>pak,
                             <cn_f16*>pp, gstride)
            else:
                cf_cross_bwd(<cn_bf16*>pg, <cn_bf16*>px, <cn_bf16*>pdx, N, C, S, rb, sp, nsp, nblk,
                             fused, pp, mode, <float*>pm, <float*>pr, <float*>pw, <float*>pmd,
                             <float*>pmdx, <float*>pa, <float*>pb, <float*>pk, t, act, <float*>pak,
                             <cn_bf16*>pp, gstride)


def group_forward(x, y, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                  weight, bias, mean, var, rstd, double eps, int nt):
    """Per-sample training forward: statistics per (n, g) over C/G channels and S.

    ``mean``, ``var``, ``rstd`` are ``(N, G)`` outputs in the statistics
    dtype; other arguments as in :func:`cross_forward`.
    """
    _group_forward(x, y, cl, N, C, S, G, weight, bias, mean, var, rstd, eps, nt)


cdef int _group_forward(x, y, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                        weight, bias, mean, var, rstd, double eps, int nt, bint rms=False,
                        int act=ACT_NONE, residual=None, h=None) except -1:
    cdef int dt = _dtype_num(x)
    _check_act(act)
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    x = _in(x, dt, size, "x")
    _out(y, dt, size, "y")
    weight = _in(weight, pt, C, "weight")
    bias = _in(bias, pt, C, "bias")
    _out(mean, pt, N * G, "mean")
    _out(var, pt, N * G, "var")
    _out(rstd, pt, N * G, "rstd")
    if G < 1 or C % G:
        raise ValueError(f"groups: expected a divisor of C={C}, got {G}")
    if rms and S != 1:
        raise ValueError(f"rms: RMSNorm statistics are for rows (S == 1), got S={S}")
    if residual is not None:
        if S != 1 or G != 1:
            raise ValueError(f"residual: the fused add is for rows (S == 1, G == 1), got S={S}, G={G}")
        residual = _in(residual, dt, size, "residual")
        _out(h, dt, size, "h")
    cl = cl and S > 1  # (N, 1, C) channels-last is (N, C, 1) channels-first
    cdef int t = _nthreads(size, N if cl else N * G, nt)
    cdef Py_ssize_t rbs = max(1, BLK // C), sstride = 5 * C + 3 * G
    # scratch only for channels-last; small calls skip the allocations
    cdef cnp.ndarray scratch = _empty1(t * sstride, F64) if cl else _EMPTY
    cdef cnp.ndarray kk = _empty1(t * (6 * C + 48), pt) if cl else _EMPTY
    cdef void* px = ptr(x)
    cdef void* py = ptr(y)
    cdef void* pw = ptr(weight)
    cdef void* pb = ptr(bias)
    cdef void* pm = ptr(mean)
    cdef void* pv = ptr(var)
    cdef void* pr = ptr(rstd)
    cdef void* pk = ptr(kk)
    cdef double* ps = <double*>ptr(scratch)
    cdef void* prs = optr(residual)
    cdef void* ph = optr(h)
    # (h is written with ordinary stores and read back at once; y streams unless it is an input)
    _stream(size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x), py, px, prs if prs != NULL else px)
    with nogil:
        if dt == F32:
            grp_fwd(<float*>px, <float*>py, N, C, S, G, cl, rbs, eps, <float*>pw, <float*>pb,
                    <float*>pm, <float*>pv, <float*>pr, ps, sstride, <float*>pk, t, rms, act, <const float*>prs, <float*>ph)
        elif dt == F64:
            grp_fwd(<double*>px, <double*>py, N, C, S, G, cl, rbs, eps, <double*>pw,
                    <double*>pb, <double*>pm, <double*>pv, <double*>pr, ps, sstride,
                    <double*>pk, t, rms, act, <const double*>prs, <double*>ph)
        elif dt == F16:
            grp_fwd(<cn_f16*>px, <cn_f16*>py, N, C, S, G, cl, rbs, eps, <float*>pw, <float*>pb,
                    <float*>pm, <float*>pv, <float*>pr, ps, sstride, <float*>pk, t, rms, act, <const cn_f16*>prs, <cn_f16*>ph)
        else:
            grp_fwd(<cn_bf16*>px, <cn_bf16*>py, N, C, S, G, cl, rbs, eps, <float*>pw, <float*>pb,
                    <float*>pm, <float*>pv, <float*>pr, ps, sstride, <float*>pk, t, rms, act, <const cn_bf16*>prs, <cn_bf16*>ph)
    return 0


def group_backward(dy, x, dx, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                   mean, rstd, weight, int nt, bint rms=False, int act=ACT_NONE, bias=None, dh=None):
    """Per-sample training backward; returns ``(dweight, dbias)`` in the statistics dtype.

    ``dx`` (written in place) may be None to compute the parameter gradients only.
    ``rms``: through RMSNorm statistics (rows, S == 1). ``act``: through the
    activation forward_train applied (g = dy·act'(z) in place of dy, z
    recomputed from x, mean, rstd, weight and ``bias``): channels-first groups
    (S > 1) that fit in L2 compute g per group into per-thread scratch (no extra
    memory traffic); channels-last problems and rows (LayerNorm, RMSNorm) take a
    whole-tensor prologue (_act_prologue). ``dh`` (rows, the
    fused add-and-norm): ``dx = dh + the norm's dx`` in the same sweep; dx
    may be dy, x or dh itself.
    """
    cdef int dt = _dtype_num(x)
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    dy = _in(dy, dt, size, "dy")
    x = _in(x, dt, size, "x")
    if dx is not None:
        _out(dx, dt, size, "dx")
    weight = _in(weight, pt, C, "weight")
    mean = _in(mean, pt, N * G, "mean")
    rstd = _in(rstd, pt, N * G, "rstd")
    if G < 1 or C % G:
        raise ValueError(f"groups: expected a divisor of C={C}, got {G}")
    if rms and S != 1:
        raise ValueError(f"rms: RMSNorm statistics are for rows (S == 1), got S={S}")
    if dh is not None:
        if S != 1 or G != 1 or dx is None:
            raise ValueError(f"dh: the fused add's gradient is for rows (S == 1, G == 1) with dx, got S={S}, G={G}")
        dh = _in(dh, dt, size, "dh")
    cl = cl and S > 1
    _check_act(act)
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(<cnp.ndarray>x)
    cdef Py_ssize_t gstride = 0, gdoubles = 0
    if act != ACT_NONE:
        bias = _in(bias, pt, C, "bias")
        if not cl and S > 1 and 2 * (C // G) * S * item <= FUSE_BYTES:
            gstride = ((C // G) * S * item + 63) // 64 * 64 // item  # a group of g per thread
            gdoubles = gstride * item // 8
        else:
            dy = _act_prologue(dy, x, dx, cl, N, C, S, G, mean, rstd, weight, bias, _EMPTY, act, dt, nt)
            act = ACT_NONE
    else:
        bias = _EMPTY  # not read
    cdef Py_ssize_t sbs = _sample_block(N, C * S)
    cdef Py_ssize_t nsb = (N + sbs - 1) // sbs
    # The partials take nsb·C doubles twice: long per-element-affine rows take the
    # column-tiled kernel (no partials), other problems fewer, larger sample
    # blocks (at least 4 where C alone exceeds the bound). Shape-determined.
    cdef bint tiled = S == 1 and not cl and C > LN_FUSE_C
    if not tiled and nsb * C > PART_MAX:
        nsb = min(nsb, max(4, PART_MAX // C))
        sbs = (N + nsb - 1) // nsb
        nsb = (N + sbs - 1) // sbs
    cdef Py_ssize_t cg = C // G
    cdef Py_ssize_t units = G * ((cg + LN_TILE - 1) // LN_TILE) if tiled else (nsb if cl else nsb * G)
    cdef int t = _nthreads(size, units, nt)
    # S == 1 fused: 2·cg floats of column partials per thread
    cdef Py_ssize_t sstride = 3 * LN_TILE if tiled else (4 * C if cl else cg if S == 1 else 2 * cg)
    # dweight/dbias partials per sample block, reduced below in block order
    # (one kept block: pwa and pba are its two halves)
    cdef cnp.ndarray pwb = _EMPTY if tiled else _scratch64(2 * nsb * C + t * gdoubles)
    cdef cnp.ndarray scratch = _empty1(t * sstride, F64)
    cdef cnp.ndarray kk = _empty1(t * (8 * C + 64) if cl else 0, pt)
    # tiled: per row-group constants and one batch of piece sums (per-token calls
    # skip the allocations)
    cdef cnp.ndarray rka = _empty1(5 * N * G, F64) if tiled else _EMPTY
    cdef cnp.ndarray slots = _empty1(3 * LN_BATCH, F64) if tiled else _EMPTY
    cdef cnp.ndarray dw = _empty1(C, pt), db = _empty1(C, pt)
    cdef void* pg = ptr(dy)
    cdef void* px = ptr(x)
    cdef void* pdx = optr(dx)
    cdef void* pm = ptr(mean)
    cdef void* pr = ptr(rstd)
    cdef void* pw = ptr(weight)
    cdef void* pk = ptr(kk)
    cdef double* ppw = <double*>ptr(pwb)
    cdef double* ppb = ppw if tiled else ppw + nsb * C
    cdef double* ps = <double*>ptr(scratch)
    cdef double* prk = <double*>ptr(rka)
    cdef double* psl = <double*>ptr(slots)
    cdef void* pdw = ptr(dw)
    cdef void* pdb = ptr(db)
    cdef void* pbias = ptr(bias)
    cdef void* pgs = <void*>(ppw + 2 * nsb * C)  # the activation's scratch (after the partials)
    cdef void* pdh = optr(dh)
    _stream(0 if dx is None or (pdh != NULL and pdx == pdh) else size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x),
            pdx, pg, px)
    with nogil:
        if tiled:
            if dt == F32:
                ln_tiled_bwd(<float*>pg, <float*>px, <float*>pdx, N, C, G, <float*>pm, <float*>pr,
                             <float*>pw, <float*>pdw, <float*>pdb, prk, psl, ps, t, rms, <const float*>pdh)
            elif dt == F64:
                ln_tiled_bwd(<double*>pg, <double*>px, <double*>pdx, N, C, G, <double*>pm, <double*>pr,
                             <double*>pw, <double*>pdw, <double*>pdb, prk, psl, ps, t, rms, <const double*>pdh)
            elif dt == F16:
                ln_tiled_bwd(<cn_f16*>pg, <cn_f16*>px, <cn_f16*>pdx, N, C, G, <float*>pm, <float*>pr,
                             <float*>pw, <float*>pdw, <float*>pdb, prk, psl, ps, t, rms, <const cn_f16*>pdh)
            else:
                ln_tiled_bwd(<cn_bf16*>pg, <cn_bf16*>px, <cn_bf16*>pdx, N, C, G, <float*>pm, <float*>pr,
                             <float*>pw, <float*>pdw, <float*>pdb, prk, psl, ps, t, rms, <const cn_bf16*>pdh)
        else:
            if dt == F32:
                grp_bwd(<float*>pg, <float*>px, <float*>pdx, N, C, S, G, cl, sbs, nsb, <float*>pm,
                        <float*>pr, <float*>pw, ppw, ppb, ps, sstride, <float*>pk, t, rms,
                        act, <float*>pbias, <float*>pgs, gstride, <const float*>pdh)
            elif dt == F64:
                grp_bwd(<double*>pg, <double*>px, <double*>pdx, N, C, S, G, cl, sbs, nsb,
                        <double*>pm, <double*>pr, <double*>pw, ppw, ppb, ps, sstride,
                        <double*>pk, t, rms, act, <double*>pbias, <double*>pgs, gstride, <const double*>pdh)
            elif dt == F16:
                grp_bwd(<cn_f16*>pg, <cn_f16*>px, <cn_f16*>pdx, N, C, S, G, cl, sbs, nsb, <float*>pm,
                        <float*>pr, <float*>pw, ppw, ppb, ps, sstride, <float*>pk, t, rms,
                        act, <float*>pbias, <cn_f16*>pgs, gstride, <const cn_f16*>pdh)
            else:
                grp_bwd(<cn_bf16*>pg, <cn_bf16*>px, <cn_bf16*>pdx, N, C, S, G, cl, sbs, nsb, <float*>pm,
                        <float*>pr, <float*>pw, ppw, ppb, ps, sstride, <float*>pk, t, rms,
                        act, <float*>pbias, <cn_bf16*>pgs, gstride, <const cn_bf16*>pdh)
            sum_block_partials(ppw, ppb, nsb, C, pdw, pdb, pt == F64,
                               t if nsb * C >= SERIAL_ELEMS // 4 and C >= t else 1)
    return dw, db


cdef inline bint _vector_of(object a, int t1, int t2, Py_ssize_t c):
    """a is a C-contiguous, aligned, native-order 1-D ndarray of c values of dtype number t1 or t2."""
    if not isinstance(a, cnp.ndarray):
        return False
    cdef cnp.ndarray arr = a
    cdef int t = cnp.PyArray_TYPE(arr)
    return (cnp.PyArray_NDIM(arr) == 1 and cnp.PyArray_DIMS(arr)[0] == c and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and cnp.PyArray_ISBEHAVED_RO(arr) and (t == t1 or t == t2))


cdef inline double _ld64(const void* p, int dt, Py_ssize_t i) noexcept nogil:
    return (<const double*>p)[i] if dt == F64 else <double>(<const float*>p)[i]


cdef inline double _rnd(int dt, double v) noexcept nogil:
    """v rounded to dtype number dt (float64, else float32), as a double."""
    return v if dt == F64 else <double><float>v


cdef inline void _st64(void* p, int dt, Py_ssize_t i, double v) noexcept nogil:
    """p[i] = v in dtype number dt (float64, else float32)."""
    if dt == F64:
        (<double*>p)[i] = v
    else:
        (<float*>p)[i] = <float>v


def fold_frozen(mean, var, weight, bias, double eps):
    """Eval-mode constants ``[mean, rstd, scale, shift]`` in weight's dtype, computed
    in double: ``rstd = 1/sqrt(var + eps)``, ``scale = weight·rstd``, ``shift =
    bias - mean·scale``; None unless weight and bias are C-contiguous float32 or
    float64 vectors of one dtype and mean and var C-contiguous float32 or float64
    vectors of their length, all aligned and in native byte order (the caller
    then computes them otherwise).

    scale and shift are computed from mean and rstd as returned (rounded to
    weight's dtype), so that a backward given only mean, rstd, weight and bias
    recomputes the very scale and shift the forward used (an activation's
    backward recomputes z = x·scale + shift from them: _cross_act_consts).
    With float64 parameters nothing is rounded."""
    if not isinstance(weight, cnp.ndarray):
        return None
    cdef int pt = cnp.PyArray_TYPE(<cnp.ndarray>weight)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>weight)
    if not (_vector_of(weight, F32, F64, n) and _vector_of(bias, pt, pt, n)
            and _vector_of(mean, F32, F64, n) and _vector_of(var, F32, F64, n)):
        return None
    cdef int mt = cnp.PyArray_TYPE(<cnp.ndarray>mean), vt = cnp.PyArray_TYPE(<cnp.ndarray>var)
    cdef Py_ssize_t i
    cdef cnp.ndarray om = _empty1(n, pt), orr = _empty1(n, pt), osc = _empty1(n, pt), osh = _empty1(n, pt)
    cdef const void* pm = ptr(mean)
    cdef const void* pv = ptr(var)
    cdef const void* pw = ptr(weight)
    cdef const void* pb = ptr(bias)
    cdef void* qm = ptr(om)
    cdef void* qr = ptr(orr)
    cdef void* qs = ptr(osc)
    cdef void* qh = ptr(osh)
    cdef double m, r, sc
    for i in range(n):
        m = _rnd(pt, _ld64(pm, mt, i))
        r = _rnd(pt, 1.0 / sqrt(_ld64(pv, vt, i) + eps))
        sc = _rnd(pt, _ld64(pw, pt, i) * r)
        _st64(qm, pt, i, m)
        _st64(qr, pt, i, r)
        _st64(qs, pt, i, sc)
        _st64(qh, pt, i, _ld64(pb, pt, i) - m * sc)
    return [om, orr, osc, osh]


def affine(x, y, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, scale, shift, int nt, int act=ACT_NONE):
    """Eval-mode forward ``y = act(x·scale[c] + shift[c])``: one multiply-add per element
    (and the activation, in the same sweep)."""
    cdef int dt = _dtype_num(x)
    _check_act(act)
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    x = _in(x, dt, size, "x")
    _out(y, dt, size, "y")
    scale = _in(scale, pt, C, "scale")
    shift = _in(shift, pt, C, "shift")
    cl = cl or S == 1
    cdef int t = _nthreads(size, N * S if cl else N * C, nt)
    cdef void* px = ptr(x)
    cdef void* py = ptr(y)
    cdef void* pa = ptr(scale)
    cdef void* pb = ptr(shift)
    _stream(size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x), py, px)
    with nogil:
        if dt == F32:
            affine_k(<float*>px, <float*>py, N, C, S, cl, <float*>pa, <float*>pb, t, act)
        elif dt == F64:
            affine_k(<double*>px, <double*>py, N, C, S, cl, <double*>pa, <double*>pb, t, act)
        elif dt == F16:
            affine_k(<cn_f16*>px, <cn_f16*>py, N, C, S, cl, <float*>pa, <float*>pb, t, act)
        else:
            affine_k(<cn_bf16*>px, <cn_bf16*>py, N, C, S, cl, <float*>pa, <float*>pb, t, act)


def parallel_copy(src, dst, int nt):
    """Copy ``src`` into ``dst`` (same nbytes, C-contiguous) with ``nt`` threads,
    whole lines by streaming stores.

    The benchmark's memory-bandwidth reference.
    """
    cdef cnp.ndarray s = src, d = dst
    if not (cnp.PyArray_IS_C_CONTIGUOUS(s) and cnp.PyArray_IS_C_CONTIGUOUS(d)) or s.nbytes != d.nbytes:
        raise ValueError("src, dst: expected C-contiguous arrays of equal size")
    if not cnp.PyArray_ISWRITEABLE(d):
        raise ValueError("dst: output array is read-only")
    cdef Py_ssize_t n = s.nbytes
    cdef char* ps = <char*>ptr(s)
    cdef char* pd = <char*>ptr(d)
    with nogil:
        copy_k(ps, pd, n, nt)


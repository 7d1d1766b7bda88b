"""``out=``: every forward and backward writes into a caller's buffer, in place where safe.

The results must be bit-identical to the plain call's (the same kernel, only
the destination differs), for a separate buffer and for ``out`` = an input
(forward: x; backward: dy or x). The shapes reach every kernel path: serial
and threaded, channels-first fused (a channel per thread) and split,
channels-last, per-sample groups in both layouts, LayerNorm rows short and
long (the column-tiled backward), and outputs past the streaming-store size.
A kernel that read a value after writing its output there would differ from
the plain call, so these tests are the per-kernel in-place decision.
"""

import numpy as np
import pytest

import cnorm
from cnorm.backends import get_backend_instance
from helpers import NORMS, same_bits

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

RNG = np.random.default_rng(11)

# (norm, shape, layout, extra keywords): layout "cf" C-contiguous, "cl" channels-last
# strides over the logical (N, C, ...) shape, "last" channels on the last axis.
CASES = [
    ("batch_norm", (4, 6, 5), "cf", {}),
    ("batch_norm", (4, 6, 5), "cl", {}),
    ("batch_norm", (64, 10), "cf", {}),  # (N, C): the channels-last kernel
    ("batch_norm", (8, 16, 64, 64), "cf", {}),  # fused: a channel per thread
    ("batch_norm", (2, 3, 300000), "cf", {}),  # split channels (1.2 MB per channel)
    ("batch_norm", (8, 16, 64, 64), "cl", {}),
    ("batch_norm", (4, 16, 32, 33), "last", {}),
    ("batch_norm", (4, 16, 256, 128), "cf", {}),  # 8 MiB: streaming stores
    ("instance_norm", (4, 6, 5), "cf", {}),
    ("instance_norm", (4, 8, 64, 64), "cf", {}),
    ("instance_norm", (4, 8, 64, 64), "cl", {}),
    ("group_norm", (4, 6, 5), "cf", {"num_groups": 3}),
    ("group_norm", (8, 32, 32, 32), "cf", {"num_groups": 8}),
    ("group_norm", (8, 32, 32, 32), "cl", {"num_groups": 8}),
    ("group_norm", (4, 64, 128, 64), "last", {"num_groups": 4}),  # 8 MiB
    ("layer_norm", (4, 6, 5), "cf", {"normalized_shape": (5,)}),
    ("layer_norm", (4, 6, 5), "cf", {"normalized_shape": (6, 5)}),
    ("layer_norm", (256, 768), "cf", {"normalized_shape": (768,)}),
    ("layer_norm", (3, 40000), "cf", {"normalized_shape": (40000,)}),  # column-tiled backward
    ("layer_norm", (2048, 1024), "cf", {"normalized_shape": (1024,)}),  # 8 MiB
]


def case_id(case):
    norm, shape, layout, kw = case
    return f"{norm}-{'x'.join(map(str, shape))}-{layout}" + ("-g" if "num_groups" in kw else "")


DTYPES = [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])


def dtype_id(dt):
    return np.dtype(dt).name


def make(shape, layout, dtype, seed=0):
    rng = np.random.default_rng(seed)
    data = (0.5 + rng.standard_normal(shape)).astype(dtype)
    if layout == "cl":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(data, 1, -1)), -1, 1)
    return data


def empty_like_layout(a):
    """A fresh buffer with a's shape, dtype and strides order (NumPy's empty_like keeps it)."""
    return np.empty_like(a)


def modes(norm):
    if norm == "batch_norm":
        return [{"training": True}, {"training": False}]
    if norm == "instance_norm":
        return [{"use_input_stats": True}, {"use_input_stats": False}]
    return [{}]


def call_forward(norm, x, w, b, rm, rv, backend, kw, mode, **extra):
    channel_axis = -1 if kw.get("layout") == "last" else 1
    if norm == "batch_norm":
        return cnorm.batch_norm_forward(x, w, b, rm, rv, eps=1e-3, channel_axis=channel_axis, backend=backend,
                                        **mode, **extra)
    if norm == "instance_norm":
        return cnorm.instance_norm_forward(x, w, b, rm, rv, eps=1e-3, channel_axis=channel_axis,
                                           backend=backend, **mode, **extra)
    if norm == "group_norm":
        return cnorm.group_norm_forward(x, kw["num_groups"], w, b, eps=1e-3, channel_axis=channel_axis,
                                        backend=backend, **extra)
    return cnorm.layer_norm_forward(x, kw["normalized_shape"], w, b, eps=1e-3, backend=backend, **extra)


class Setup:
    """One case's arrays on the backend under test."""

    def __init__(self, backend, case, dtype, mode):
        norm, shape, layout, kw = case
        self.norm, self.backend, self.mode = norm, backend, mode
        self.kw = dict(kw, layout=layout)
        if norm == "layer_norm":
            pshape = kw["normalized_shape"]
        else:
            pshape = (shape[-1] if layout == "last" else shape[1],)
        self.x_host = make(shape, layout, dtype, 1)
        self.dy_host = make(shape, layout, dtype, 2)
        rng = np.random.default_rng(3)
        sd = np.float64 if np.dtype(dtype) == np.float64 else np.float32
        self.w = backend.asarray((1 + 0.2 * rng.standard_normal(pshape)).astype(sd))
        self.b = backend.asarray((0.1 * rng.standard_normal(pshape)).astype(sd))
        tracked = norm in ("batch_norm", "instance_norm")
        self.rm_host = rng.standard_normal(pshape).astype(sd) if tracked else None
        self.rv_host = (0.5 + rng.random(pshape)).astype(sd) if tracked else None

    def arrays(self):
        """Fresh copies of x, dy and the running statistics (kernels may write them)."""
        be = self.backend
        copy = lambda a: None if a is None else be.asarray(a.copy(order="K"))  # noqa: E731
        return copy(self.x_host), copy(self.dy_host), copy(self.rm_host), copy(self.rv_host)

    def forward(self, x, rm, rv, **out):
        return call_forward(self.norm, x, self.w, self.b, rm, rv, self.backend.name, self.kw, self.mode, **out)

    def backward(self, dy, x, saved, **out):
        return getattr(cnorm, f"{self.norm}_backward")(dy, x, saved, self.w, **out)


def host(backend, a):
    return None if a is None else backend.to_numpy(a)


def assert_identical(backend, got, want, what):
    same_bits(host(backend, got), host(backend, want), what)


def check_layout_kept(backend, out, x_strides):
    # out keeps its own strides (the caller's buffer) which equal x's order here
    assert tuple(out.strides) == tuple(x_strides)


def case_params():
    params = []
    for case in CASES:
        for dtype in DTYPES:
            # the 8 MiB cases in float32 only keep the suite short
            if np.dtype(dtype) != np.float32 and np.prod(case[1]) * 4 >= 8 << 20:
                continue
            for mode in modes(case[0]):
                mid = "-".join(f"{k}={v}" for k, v in mode.items()) or "train"
                params.append(pytest.param(case, dtype, mode, id=f"{case_id(case)}-{dtype_id(dtype)}-{mid}"))
    return params


@pytest.mark.parametrize("case, dtype, mode", case_params())
def test_out_matches_plain_call(backend, case, dtype, mode):
    """Separate buffer, out=x in the forward, out=dy and out=x in the backward:
    each result bit-identical to the plain call's, returned as the buffer itself."""
    if np.dtype(dtype) not in [np.dtype(d) for d in get_backend_instance(backend.name).supported_dtypes()]:
        pytest.skip(f"{backend.name} has no {np.dtype(dtype)} kernels")
    s = Setup(backend, case, dtype, mode)

    x, dy, rm, rv = s.arrays()
    y_ref, saved_ref = s.forward(x, rm, rv)
    dx_ref, dw_ref, db_ref = s.backward(dy, x, saved_ref)
    rm_ref, rv_ref = host(backend, rm), host(backend, rv)

    # a separate buffer for y and for dx
    x, dy, rm, rv = s.arrays()
    buf = backend.xp.empty_like(x)
    y, saved = s.forward(x, rm, rv, out=buf)
    assert y is buf
    assert_identical(backend, y, y_ref, "y into out")
    assert_identical(backend, x, s.x_host, "x untouched")
    if rm is not None:
        assert_identical(backend, rm, rm_ref, "running_mean")
        assert_identical(backend, rv, rv_ref, "running_var")
    dbuf = backend.xp.empty_like(x)
    dx, dw, db = s.backward(dy, x, saved, out=dbuf)
    assert dx is dbuf
    assert_identical(backend, dx, dx_ref, "dx into out")
    assert_identical(backend, dw, dw_ref, "dweight")
    assert_identical(backend, db, db_ref, "dbias")

    # forward in place: y over x
    x, dy, rm, rv = s.arrays()
    y, saved = s.forward(x, rm, rv, out=x)
    assert y is x
    assert_identical(backend, y, y_ref, "y over x")
    if rm is not None:
        assert_identical(backend, rm, rm_ref, "running_mean (in place)")
    # the overwritten x cannot serve as backward's input; the original can
    with pytest.raises(ValueError, match=r"x: .*out=x"):
        s.backward(dy, x, saved)
    x0 = backend.asarray(s.x_host.copy(order="K"))
    assert_identical(backend, s.backward(dy, x0, saved)[0], dx_ref, "dx after an in-place forward")

    # backward in place: dx over dy, then dx over x
    for target in ("dy", "x"):
        x, dy, rm, rv = s.arrays()
        _, saved = s.forward(x, rm, rv)
        out = dy if target == "dy" else x
        dx, dw, db = s.backward(dy, x, saved, out=out)
        assert dx is out
        assert_identical(backend, dx, dx_ref, f"dx over {target}")
        assert_identical(backend, dw, dw_ref, f"dweight (dx over {target})")
        assert_identical(backend, db, db_ref, f"dbias (dx over {target})")


@pytest.mark.parametrize("norm", NORMS)
def test_plain_functions_take_out(backend, norm):
    """The forward-only functions take out= too, and out=x normalizes in place."""
    x = backend.asarray(make((4, 6, 5), "cf", np.float32, 4))
    want = backend.to_numpy(_plain(norm, x, backend.name))
    buf = backend.xp.empty_like(x)
    assert _plain(norm, x, backend.name, out=buf) is buf
    assert_identical(backend, buf, want, "out")
    assert _plain(norm, x, backend.name, out=x) is x
    assert_identical(backend, x, want, "in place")


def _plain(norm, x, backend, **out):
    if norm == "batch_norm":
        return cnorm.batch_norm(x, backend=backend, **out)
    if norm == "instance_norm":
        return cnorm.instance_norm(x, backend=backend, **out)
    if norm == "group_norm":
        return cnorm.group_norm(x, 2, backend=backend, **out)
    return cnorm.layer_norm(x, 5, backend=backend, **out)


def test_eval_inference_in_place(backend):
    """Inference: the running statistics normalize activations in place, read-only statistics fine."""
    x = backend.asarray(make((8, 16, 16, 16), "cl", np.float32, 5))
    rm = backend.asarray(np.linspace(-1, 1, 16).astype(np.float32))
    rv = backend.asarray(np.linspace(0.5, 2, 16).astype(np.float32))
    if backend.xp is np:
        rm.flags.writeable = rv.flags.writeable = False
    want = backend.to_numpy(cnorm.batch_norm(x, None, None, rm, rv, training=False, backend=backend.name))
    y = cnorm.batch_norm(x, None, None, rm, rv, training=False, backend=backend.name, out=x)
    assert y is x
    assert_identical(backend, x, want, "in place")


# -- accepted forms ------------------------------------------------------------------

def test_out_for_copied_inputs():
    """x the kernels read through a copy (strided, byte-swapped) still writes a
    C-contiguous out directly; an out in x's own layout is needed otherwise."""
    x = make((4, 6, 10), "cf", np.float32, 6)
    strided = x[:, :, ::2]
    want = cnorm.batch_norm(strided)
    out = np.empty(strided.shape, np.float32)
    assert cnorm.batch_norm(strided, out=out) is out
    np.testing.assert_array_equal(out, want)
    swapped = x.astype(">f4")
    out = np.empty(x.shape, np.float32)
    cnorm.layer_norm(swapped, 10, out=out)
    np.testing.assert_array_equal(out, cnorm.layer_norm(x, 10))


def test_out_channels_last_for_channels_last_x():
    x = make((2, 8, 5, 5), "cl", np.float32, 7)
    out = np.empty_like(x)  # keeps the channels-last strides
    assert out.strides == x.strides
    cnorm.group_norm(x, 4, out=out)
    np.testing.assert_array_equal(out, cnorm.group_norm(x, 4))


def test_empty_input_with_out(backend):
    x = backend.xp.zeros((0, 3, 4), np.float32)
    out = backend.xp.empty_like(x)
    y, saved = cnorm.batch_norm_forward(x, backend=backend.name, training=False,
                                        running_mean=backend.xp.zeros(3, np.float32),
                                        running_var=backend.xp.ones(3, np.float32), out=out)
    assert y is out
    dx, _, _ = cnorm.batch_norm_backward(x, x, saved, out=out)
    assert dx is out


# -- errors --------------------------------------------------------------------------

def _bn(x, **kw):
    return cnorm.batch_norm(x, **kw)


@pytest.mark.parametrize("bad, kind, match", [
    (lambda x: np.empty((4, 6), np.float32), ValueError, r"out: expected shape \(4, 6, 5\)"),
    (lambda x: np.empty(x.shape, np.float64), TypeError, r"out: expected dtype float32 .*got dtype float64"),
    (lambda x: np.empty(x.shape, ">f4"), TypeError, r"out: expected dtype float32 .*got dtype >f4"),
    (lambda x: x.tolist(), TypeError, r"out: the 'cython' backend expects"),
    (lambda x: np.ma.masked_array(np.empty_like(x)), TypeError, r"out: "),
    (lambda x: np.empty((4, 5, 6), np.float32).transpose(0, 2, 1), ValueError,
     r"out: expected a C-contiguous array"),
    (lambda x: np.empty((4, 6, 10), np.float32)[:, :, ::2], ValueError, r"out: expected a C-contiguous array"),
])
def test_bad_out_is_refused(bad, kind, match):
    x = make((4, 6, 5), "cf", np.float32, 8)
    out = bad(x)
    before = np.array(out, copy=True) if isinstance(out, np.ndarray) else None
    with pytest.raises(kind, match=match):
        _bn(x, backend="cython", out=out)
    if before is not None:
        np.testing.assert_array_equal(np.asarray(out), before)


def test_read_only_out_is_refused():
    x = make((4, 6, 5), "cf", np.float32, 8)
    out = np.zeros_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writable array"):
        cnorm.batch_norm(x, out=out)


def test_unaligned_out_is_refused():
    x = make((4, 6, 5), "cf", np.float32, 8)
    raw = np.zeros(x.nbytes + 1, np.uint8)
    out = np.frombuffer(raw.data, np.float32, count=x.size, offset=1).reshape(x.shape)
    with pytest.raises(ValueError, match="out: expected an aligned array"):
        cnorm.layer_norm(x, 5, out=out)
    assert not raw.any()


def test_layout_error_names_the_layout_needed():
    x = make((2, 8, 5, 5), "cl", np.float32, 7)
    with pytest.raises(ValueError, match=r"out: expected a channels-last array"):
        cnorm.batch_norm(x, out=np.empty(x.shape, np.float32))
    with pytest.raises(ValueError, match=r"out: expected a C-contiguous array"):
        cnorm.batch_norm(np.ascontiguousarray(x), out=np.empty_like(x))


@pytest.mark.parametrize("norm", ["batch_norm", "layer_norm"])
def test_partial_overlap_is_refused(norm):
    """A buffer that shares some but not all of x's memory would have x read after being written."""
    base = make((5, 6, 5), "cf", np.float32, 9)
    x = base[:4]
    out = base[1:]
    before = base.copy()
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    with pytest.raises(ValueError, match="out: overlaps x partly"):
        if norm == "batch_norm":
            cnorm.batch_norm(x, None, None, rm, rv, out=out)
        else:
            cnorm.layer_norm(x, 5, out=out)
    np.testing.assert_array_equal(base, before)
    np.testing.assert_array_equal(rm, 0)  # nothing updated either


def test_interleaved_views_are_not_an_overlap():
    """Views into one buffer that share no element are separate buffers (exact check)."""
    base = np.zeros((4, 6, 10), np.float32)
    base[:, :, 0::2] = make((4, 6, 5), "cf", np.float32, 10)
    x = base[:, :, 0::2]
    out = np.empty((4, 6, 5), np.float32)
    want = cnorm.batch_norm(x)
    cnorm.batch_norm(x, out=out)
    np.testing.assert_array_equal(out, want)


def test_out_overlapping_parameters_is_refused():
    x = make((4, 6, 5), "cf", np.float32, 12)
    out = np.empty_like(x)
    w = out[0, :, 0]  # a strided view of out's memory
    with pytest.raises(ValueError, match="out: shares memory with weight"):
        cnorm.batch_norm(x, w, out=out)
    rm = np.zeros(6, np.float32)
    rv = np.ones(6, np.float32)
    y, saved = cnorm.batch_norm_forward(x, None, None, rm, rv)
    dy = np.ones_like(x)
    dbuf = np.empty_like(x)
    with pytest.raises(ValueError, match="out: shares memory with weight"):
        cnorm.batch_norm_backward(dy, x, saved, dbuf[0, :, 0], out=dbuf)


def test_backward_out_partial_overlap_with_dy_is_refused():
    base = make((5, 6, 5), "cf", np.float32, 13)
    x = make((4, 6, 5), "cf", np.float32, 14)
    _, saved = cnorm.group_norm_forward(x, 2)
    dy = base[:4]
    with pytest.raises(ValueError, match="out: overlaps dy partly"):
        cnorm.group_norm_backward(dy, x, saved, out=base[1:])


def test_bad_out_checked_before_running_statistics_update():
    x = make((4, 6, 5), "cf", np.float32, 15)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    with pytest.raises(TypeError, match="out:"):
        cnorm.batch_norm(x, None, None, rm, rv, training=True, out=np.empty(x.shape, np.float64))
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_out_must_be_keyword():
    x = make((4, 6, 5), "cf", np.float32, 16)
    with pytest.raises(TypeError):
        cnorm.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, 1, None, np.empty_like(x))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the reference casts inf
@pytest.mark.parametrize("shape", [(64, 768), (3, 40000)], ids=["rows", "column-tiled"])
@pytest.mark.parametrize("target", ["dy", "x"])
def test_layer_norm_backward_in_place_when_float_partials_overflow(backend, shape, target):
    """float32 LayerNorm backward redoes a chunk's column sums in double when a
    float partial overflows; in place, those sums must still see dy and x."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    dy[:, 5] = 3e38  # two rows of this column overflow a float sum
    w = (1 + 0.1 * rng.standard_normal(shape[1])).astype(np.float32)
    x, dy, w = backend.asarray(x), backend.asarray(dy), backend.asarray(w)
    _, saved = cnorm.layer_norm_forward(x, shape[1], w, w, backend=backend.name)
    want = [host(backend, a) for a in cnorm.layer_norm_backward(dy, x, saved, w)]
    assert np.isfinite(want[1][:5]).all()  # the other columns' sums are ordinary numbers
    out = dy if target == "dy" else x
    got = cnorm.layer_norm_backward(dy, x, saved, w, out=out)
    assert got[0] is out
    for g, e, what in zip(got, want, ("dx", "dweight", "dbias")):
        assert_identical(backend, g, e, what)

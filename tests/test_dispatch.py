"""The backend registry: naming, scoping, auto-selection, and refusing wrong array types."""

import threading

import numpy as np
import pytest

import cnorm
from cnorm.backends import get_backend_instance, resolve
from cnorm.backends.numpy_backend import NumpyBackend


class CountingBackend(NumpyBackend):
    """The reference kernels, counting calls: tests that dispatch really reaches a backend."""

    name = "counting"

    def __init__(self):
        self.calls = []

    def forward_train(self, *a, **k):
        self.calls.append("forward_train")
        return super().forward_train(*a, **k)

    def forward_eval(self, *a, **k):
        self.calls.append("forward_eval")
        return super().forward_eval(*a, **k)

    def backward_train(self, *a, **k):
        self.calls.append("backward_train")
        return super().backward_train(*a, **k)


class BrokenBackend(NumpyBackend):
    name = "broken"

    def unavailable_reason(self):
        return "its accelerator is on holiday"


@pytest.fixture
def counting():
    be = CountingBackend()
    cnorm.register_backend("counting", be)
    yield be
    cnorm.unregister_backend("counting")


X = np.random.default_rng(0).standard_normal((4, 3, 5))


def test_per_call_context_and_global_choice(counting):
    cnorm.batch_norm(X, backend="counting")
    assert counting.calls == ["forward_train"]
    with cnorm.use_backend("counting"):
        assert cnorm.get_backend() == "counting"
        y, saved = cnorm.group_norm_forward(X, 3)
        cnorm.group_norm_backward(X, X, saved)
    assert cnorm.get_backend() == "auto"
    assert counting.calls == ["forward_train", "forward_train", "backward_train"]
    cnorm.set_backend("counting")
    cnorm.batch_norm(X, running_mean=np.zeros(3), running_var=np.ones(3), training=False)
    assert counting.calls[-1] == "forward_eval"
    with cnorm.use_backend("numpy"):  # a block overrides the global choice
        cnorm.layer_norm(X, 5)
    assert len(counting.calls) == 4
    cnorm.layer_norm(X, 5, backend="numpy")  # and the argument overrides both
    assert len(counting.calls) == 4


def test_context_is_per_thread(counting):
    seen = {}

    def other():
        seen["backend"] = cnorm.get_backend()

    with cnorm.use_backend("counting"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["backend"] == "auto"


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; known backends are 'auto', 'numpy'"):
        cnorm.set_backend("nope")
    cnorm.register_backend("broken", BrokenBackend())
    try:
        assert "broken" not in cnorm.available_backends()
        assert "holiday" in cnorm.available_backends(with_reasons=True)["broken"]
        with pytest.raises(cnorm.BackendUnavailableError, match="holiday"):
            cnorm.batch_norm(X, backend="broken")
        with pytest.raises(cnorm.BackendUnavailableError, match="holiday"):
            with cnorm.use_backend("broken"):
                pass
    finally:
        cnorm.unregister_backend("broken")


def test_named_backend_never_falls_back():
    reasons = cnorm.available_backends(with_reasons=True)
    for name, why in reasons.items():
        if why is not None:
            with pytest.raises(cnorm.BackendUnavailableError, match=name):
                cnorm.batch_norm(X, backend=name)


def test_auto_picks_by_array_type():
    chosen = resolve("auto", [X]).name
    assert chosen == ("cython" if "cython" in cnorm.available_backends() else "numpy")


class FakeDeviceArray:
    """Looks like an array from another library (as a CuPy array would)."""

    shape, ndim, dtype = (4, 3, 5), 3, np.dtype(np.float32)


def test_cpu_backends_refuse_foreign_arrays():
    for name in ("numpy", "cython"):
        if name not in cnorm.available_backends():
            continue
        with pytest.raises(TypeError, match=rf"x: the '{name}' backend expects a numpy.ndarray"):
            cnorm.batch_norm(FakeDeviceArray(), backend=name)


def test_cupy_arrays_are_refused_by_cpu_backends():
    cupy = pytest.importorskip("cupy")
    if "cupy" not in cnorm.available_backends():
        pytest.skip("no CUDA device: " + str(cnorm.available_backends(with_reasons=True)["cupy"]))
    x = cupy.ones((4, 3, 5), dtype=cupy.float32)
    with pytest.raises(TypeError, match="backend='cupy'"):
        cnorm.batch_norm(x, backend="numpy")
    assert resolve(None, [x]).name == "cupy"
    with pytest.raises(TypeError, match="x: the 'cupy' backend expects"):
        cnorm.batch_norm(np.ones((4, 3, 5), np.float32), backend="cupy")


def test_instances_are_cached():
    assert get_backend_instance("numpy") is get_backend_instance("numpy")


def test_thread_control_round_trip():
    n = cnorm.get_num_threads()
    assert n >= 1
    cnorm.set_num_threads(1)
    try:
        assert cnorm.get_num_threads() == 1
    finally:
        cnorm.set_num_threads(n)
    with pytest.raises(ValueError, match="n: expected a positive thread count"):
        cnorm.set_num_threads(0)
    with pytest.raises(TypeError, match="n: expected an int"):
        cnorm.set_num_threads(1.5)


@pytest.mark.parametrize("kind", [np.int64, np.int32, np.int16, np.uint8])
def test_set_num_threads_takes_numpy_integers(kind):
    """NumPy integers count as ints here as everywhere else (num_groups, normalized_shape, ...)."""
    n = cnorm.get_num_threads()
    try:
        cnorm.set_num_threads(kind(1))
        assert cnorm.get_num_threads() == 1
        if cnorm._config.config()["openmp_compiled"]:
            cnorm.set_num_threads(kind(2))
            assert cnorm.get_num_threads() == 2
    finally:
        cnorm.set_num_threads(n)
    with pytest.raises(ValueError, match=r"n: expected a positive thread count below 2\*\*31, got 0"):
        cnorm.set_num_threads(kind(0))


@pytest.mark.parametrize("flag", [True, False, np.bool_(True)])
def test_set_num_threads_rejects_bools(flag):
    with pytest.raises(TypeError, match=r"n: expected an int, got (bool|numpy\.bool)"):
        cnorm.set_num_threads(flag)


def test_set_num_threads_rejects_integer_valued_floats():
    for value in (2.0, np.float64(2.0), "2"):
        with pytest.raises(TypeError, match="n: expected an int"):
            cnorm.set_num_threads(value)

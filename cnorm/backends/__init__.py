"""Backend registry: names → backends, and how a call picks one.

A backend is picked, in order of precedence, by the call's ``backend=``
argument, the innermost :func:`use_backend` block, or :func:`set_backend`'s
global choice. ``"auto"`` (the default) picks by array type: CuPy arrays go to
"cupy", NumPy arrays to "cython" when it is built, else "numpy". A backend the
user names is never replaced silently: if it cannot run, the call raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib

import numpy as np

from .base import Backend, Problem, stats_dtype  # noqa: F401  (re-exported)

AUTO = "auto"

# name -> "module:Class"; loaded on first use so that a missing optional
# dependency (CuPy) only makes that backend unavailable.
_REGISTRY = {
    "numpy": "cnorm.backends.numpy_backend:NumpyBackend",
    "cython": "cnorm.backends.cython_backend:CythonBackend",
    "cupy": "cnorm.backends.cupy_backend:CupyBackend",
}
_instances: dict = {}
_failures: dict = {}
_generation = 0  # bumped whenever the registry changes, so memoized choices expire
_global_choice = AUTO
_context_choice: contextvars.ContextVar = contextvars.ContextVar("cnorm_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A named backend cannot run on this machine; the message says why."""


def register_backend(name: str, spec) -> None:
    """Register a backend under ``name``.

    Parameters
    ----------
    name : str
        The name users pass as ``backend=``.
    spec : str or Backend
        ``"module:Class"`` (imported on first use) or a Backend instance.
    """
    global _generation
    _REGISTRY[name] = spec
    _instances.pop(name, None)
    _failures.pop(name, None)
    _generation += 1


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend`."""
    global _generation
    _REGISTRY.pop(name, None)
    _instances.pop(name, None)
    _failures.pop(name, None)
    _generation += 1


def registry_generation() -> int:
    """A number that changes whenever a backend is registered or removed."""
    return _generation


def _load(name: str):
    """Instantiate backend ``name``, remembering why it failed if it does."""
    if name in _instances:
        return _instances[name]
    if name in _failures:
        return None
    spec = _REGISTRY[name]
    try:
        if isinstance(spec, Backend):
            backend = spec
        else:
            module_name, cls_name = spec.split(":")
            backend = getattr(importlib.import_module(module_name), cls_name)()
        reason = getattr(backend, "unavailable_reason", lambda: None)()
        if reason:
            raise BackendUnavailableError(reason)
    except Exception as exc:  # noqa: BLE001 - any failure makes it unavailable, with the reason kept
        _failures[name] = f"{type(exc).__name__}: {exc}"
        return None
    _instances[name] = backend
    return backend


def _check_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a backend name (str), got {type(name).__name__}")
    if name != AUTO and name not in _REGISTRY:
        known = ", ".join(repr(n) for n in [AUTO, *_REGISTRY])
        raise ValueError(f"backend: unknown backend {name!r}; known backends are {known}")
    return name


def get_backend_instance(name: str) -> Backend:
    """Return the Backend object called ``name``, or raise saying why it cannot run."""
    _check_name(name)
    backend = _load(name)
    if backend is None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {_failures[name]}")
    return backend


def available_backends(with_reasons: bool = False):
    """Names of the backends that work on this machine.

    Parameters
    ----------
    with_reasons : bool, optional
        If True, return a dict mapping every known name to None (available) or
        the reason it is not.

    Examples
    --------
    >>> import cnorm
    >>> "numpy" in cnorm.available_backends()
    True
    """
    status = {name: (None if _load(name) is not None else _failures[name]) for name in _REGISTRY}
    if with_reasons:
        return status
    return [name for name, why in status.items() if why is None]


def set_backend(name: str) -> None:
    """Choose the backend for calls that name none, process-wide.

    Parameters
    ----------
    name : str
        ``"auto"`` or a registered name; an unavailable backend raises
        :class:`BackendUnavailableError` here rather than at the first call.
    """
    global _global_choice
    _check_name(name)
    if name != AUTO:
        get_backend_instance(name)
    _global_choice = name


def get_backend() -> str:
    """Return the backend name in force here (``"auto"`` unless one was chosen)."""
    ctx = _context_choice.get()
    return ctx if ctx is not None else _global_choice


@contextlib.contextmanager
def use_backend(name: str):
    """Use backend ``name`` for calls inside the block (thread- and task-local).

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> with cnorm.use_backend("numpy"):
    ...     y = cnorm.layer_norm(np.ones((2, 3)), 3)
    """
    _check_name(name)
    if name != AUTO:
        get_backend_instance(name)
    token = _context_choice.set(name)
    try:
        yield
    finally:
        _context_choice.reset(token)


def is_cupy_array(a) -> bool:
    """True for a cupy.ndarray, recognised without importing CuPy."""
    return type(a).__module__.split(".")[0] == "cupy"


def resolve(name, arrays) -> Backend:
    """Pick the Backend for a call given its ``backend=`` argument and arrays."""
    chosen = get_backend() if name is None else name
    if chosen == AUTO and _instances.get("cython") is not None and all(
        type(a) is np.ndarray for a in arrays if a is not None
    ):  # the common case, decided without further checks
        return _instances["cython"]
    _check_name(chosen)
    if chosen != AUTO:
        return get_backend_instance(chosen)
    if any(is_cupy_array(a) for a in arrays if a is not None):
        return get_backend_instance("cupy")
    for candidate in ("cython", "numpy"):
        backend = _load(candidate)
        if backend is not None:
            return backend
    raise BackendUnavailableError("no CPU backend could be loaded: " + "; ".join(_failures.values()))

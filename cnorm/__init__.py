"""cnorm: BatchNorm, LayerNorm, InstanceNorm, GroupNorm and RMSNorm for NumPy and CuPy.

Fused Cython/OpenMP CPU kernels, raw CUDA kernels through CuPy, and a NumPy
reference, behind one API where the backend is picked by name.

Examples
--------
>>> import numpy as np, cnorm
>>> x = np.random.default_rng(0).standard_normal((8, 16, 4, 4)).astype(np.float32)
>>> y, saved = cnorm.batch_norm_forward(x)
>>> dx, dweight, dbias = cnorm.batch_norm_backward(np.ones_like(y), x, saved)
"""

__version__ = "0.1.0"

from . import nn  # noqa: E402  (layers; cnorm.distributed loads lazily with mpi4py)
from ._config import get_num_threads, set_num_threads, show_config
from ._cpu import get_cpu_capability
from .backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    register_backend,
    set_backend,
    unregister_backend,
    use_backend,
)
from .functional import (
    Saved,
    add_layer_norm,
    add_layer_norm_backward,
    add_layer_norm_forward,
    add_rms_norm,
    add_rms_norm_backward,
    add_rms_norm_forward,
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
    group_norm,
    group_norm_backward,
    group_norm_forward,
    instance_norm,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
    fold_batch_norm,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
)

__all__ = [
    "__version__", "nn",
    "BackendUnavailableError", "available_backends", "get_backend", "register_backend",
    "set_backend", "unregister_backend", "use_backend",
    "get_num_threads", "set_num_threads", "show_config", "get_cpu_capability",
    "Saved",
    "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "group_norm", "group_norm_forward", "group_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
    "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "add_layer_norm", "add_layer_norm_forward", "add_layer_norm_backward",
    "add_rms_norm", "add_rms_norm_forward", "add_rms_norm_backward",
    "fold_batch_norm",
]

"""Quick GPU check of BatchNorm after moving its statistics partials to double:
time the large case (forward, backward) against PyTorch CUDA with CUDA events."""

import cupy as cp
import numpy as np
import torch

import cnorm
from gpu_bench import median_ms  # the same CUDA-event timing as the full benchmark


def timed(fn, reps=20):
    return median_ms(fn, cp, reps)


for dtype, tdtype in ((cp.float32, torch.float32), (cp.float16, torch.float16)):
    x = cp.random.standard_normal((256, 64, 112, 112), dtype=cp.float32).astype(dtype)
    w, b = cp.ones(64, cp.float32), cp.zeros(64, cp.float32)
    y, saved = cnorm.batch_norm_forward(x, w, b, backend="cupy")
    dy = cp.random.standard_normal(x.shape, dtype=cp.float32).astype(dtype)
    xt = torch.as_tensor(x, device="cuda")
    wt, bt = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")
    yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True)
    err = float(cp.abs(y.astype(cp.float32) - cp.asarray(yt.float())).max())
    f = timed(lambda: cnorm.batch_norm_forward(x, w, b, backend="cupy"))
    bw = timed(lambda: cnorm.batch_norm_backward(dy, x, saved, w))
    ft = timed(lambda: torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True))
    print(f"BN 256x64x112x112 {np.dtype(dtype).name}: cnorm fwd {f:.3f} ms bwd {bw:.3f} ms; "
          f"torch fwd {ft:.3f} ms; max |y - torch| {err:.2e}")

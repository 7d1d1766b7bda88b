"""Backward checked by central finite differences of forward (float64, small inputs)."""

import numpy as np
import pytest

from helpers import NORMS, backward, close, forward


def numeric_grad(f, a, h=1e-6):
    """Central differences of the scalar f() with respect to every element of a (in place)."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_backward_matches_finite_differences(backend, norm, mode, channel_axis):
    if mode == "eval" and norm not in ("batch_norm", "instance_norm"):
        pytest.skip("only BatchNorm and InstanceNorm have an eval mode")
    rng = np.random.default_rng(21)
    x = rng.standard_normal((3, 4, 6)) * 2 + 1
    c = x.shape[channel_axis]
    pshape = (6,) if norm == "layer_norm" else (c,)
    w, b = rng.uniform(0.5, 1.5, pshape), rng.standard_normal(pshape)
    r = rng.standard_normal(x.shape)  # loss = Σ r·y, so dy = r
    kw = {}
    if mode == "eval":
        kw = {"training": False} if norm == "batch_norm" else {"use_input_stats": False}
        kw.update(running_mean=backend.asarray(rng.standard_normal(c)),
                  running_var=backend.asarray(rng.uniform(0.5, 2, c)))
    A = backend.asarray

    def loss():
        y, _ = forward(norm, A(x), A(w), A(b), backend=backend.name, channel_axis=channel_axis,
                       normalized_shape=(6,), **kw)
        return float(np.sum(backend.to_numpy(y) * r))

    _, saved = forward(norm, A(x), A(w), A(b), backend=backend.name, channel_axis=channel_axis,
                       normalized_shape=(6,), **kw)
    dx, dw, db = backward(norm, A(r), A(x), saved, A(w))
    close(backend.to_numpy(dx), numeric_grad(loss, x), 1e-6, "dx")
    close(backend.to_numpy(dw), numeric_grad(loss, w), 1e-6, "dweight")
    close(backend.to_numpy(db), numeric_grad(loss, b), 1e-6, "dbias")

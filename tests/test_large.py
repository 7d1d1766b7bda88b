"""Arrays past 2**31 elements: no 32-bit index overflows anywhere, forward or backward.

Marked slow (each array is 4 GiB of float16 or bfloat16; a test holds up to
three, about 12.5 GiB in all; the one-row LayerNorm needs about 36 GiB and
skips, saying so, where less is available): run them with

    python -m pytest --run-slow -m slow tests/test_large.py

The inputs repeat small integers with periods 7 (x) and 5 (dy), so every
group's sums are known exactly by counting residues, without a float64 copy
of the data: the statistics, sampled outputs around the 2**31 boundary and at
the ends, and the parameter gradients are checked against those exact values.
"""

import gc
import math
import os

import numpy as np
import pytest

import cnorm
from cnorm._dtypes import BFLOAT16, FLOAT16

pytestmark = pytest.mark.slow

P, Q = 7, 5                     # periods of x and dy
L = P * Q
XV = np.arange(P, dtype=np.float64) - 3.0          # x[i] = XV[i % 7], in [-3, 3]
DV = np.array([2.0, -1.0, 0.0, 3.0, -2.0])          # dy[i] = DV[i % 5]
EPS = 1e-5
# elements: just past 2**31 (CNORM_LARGE_ELEMENTS: a smaller size, to check the checks quickly)
BIG = int(os.environ.get("CNORM_LARGE_ELEMENTS", 2**31 + 2**20 + 3))


def periodic(n, values, dtype):
    """values repeated to n elements (np.resize would build a tuple of n/len(values) references)."""
    out = np.empty(n, dtype)
    k = len(values)
    full = n // k
    out[: full * k].reshape(full, k)[...] = values.astype(dtype)
    out[full * k:] = values[: n - full * k].astype(dtype)
    return out


def range_counts(lo, hi, period):
    """How many i in [lo, hi) have each residue mod period."""
    full, rest = divmod(hi - lo, period)
    c = np.full(period, full, dtype=np.int64)
    for k in range(rest):
        c[(lo + k) % period] += 1
    return c


def ap_counts(start, step, count, period):
    """How many of start + k*step, k in [0, count), have each residue mod period."""
    c = np.zeros(period, dtype=np.int64)
    for k0 in range(period):  # k ≡ k0 (mod period) give the same residue
        if k0 < count:
            c[(start + k0 * step) % period] += (count - k0 + period - 1) // period
    return c


class Sums:
    """Exact sums over a set of flat indices, from their residue counts mod 35."""

    def __init__(self, counts):
        r = np.arange(L)
        x, d = XV[r % P], DV[r % Q]
        self.n = int(counts.sum())
        self.sx, self.sxx = float(counts @ x), float(counts @ (x * x))
        self.sd, self.sdx = float(counts @ d), float(counts @ (d * x))
        self.mean = self.sx / self.n
        self.var = self.sxx / self.n - self.mean**2
        self.rstd = 1.0 / math.sqrt(self.var + EPS)
        # Σ|dy·xhat| and Σ|dy|: the scale a float32-accumulated sum's rounding is relative to
        self.abs_dw = float(counts @ np.abs(d * (x - self.mean))) * self.rstd
        self.abs_db = float(counts @ np.abs(d))

    def dweight(self):
        return (self.sdx - self.mean * self.sd) * self.rstd

    def y(self, i):
        return (XV[i % P] - self.mean) * self.rstd

    def dx(self, i):
        """Training dx with weight 1."""
        xhat = (XV[i % P] - self.mean) * self.rstd
        mean_dy_xhat = (self.sdx - self.mean * self.sd) * self.rstd / self.n
        return self.rstd * (DV[i % Q] - self.sd / self.n - xhat * mean_dy_xhat)


def samples(n):
    around = np.arange(2**31 - 40, 2**31 + 40)
    rng = np.random.default_rng(0)
    return np.unique(np.concatenate([np.arange(40), around[around < n], np.arange(n - 40, n),
                                     rng.integers(0, n, 200)]))


def check(actual_flat, idx, expected, tol, what):
    got = actual_flat[idx].astype(np.float64)
    err = np.max(np.abs(got - expected))
    assert err <= tol * max(1.0, np.max(np.abs(expected))), f"{what}: max error {err:.3g} at sampled indices"


def check_sums(actual, expected, scale, what):
    """Channel sums accumulated in float32 blocks (merged in double): within 1e-6 of
    the sum of the terms' magnitudes (a wrong index would be off by whole terms)."""
    err = np.abs(np.asarray(actual, np.float64) - expected)
    assert np.all(err <= 1e-6 * np.asarray(scale) + 1e-6), f"{what}: errors {err} for scales {scale}"


DTYPES = [pytest.param(FLOAT16, id="f16")] + ([pytest.param(BFLOAT16, id="bf16")] if BFLOAT16 is not None else [])


def available_gib():
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20
    except (OSError, StopIteration):
        return float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_one_row_past_2_31(dtype):
    """One row of BIG values: LayerNorm's float32 weight and parameter gradients are
    as long as the row (8 GiB each here), about 36 GiB in all."""
    n = BIG
    need = 36 * n / 2**31
    if available_gib() < need:
        pytest.skip(f"needs about {need:.0f} GiB of memory, {available_gib():.0f} GiB available")
    x = periodic(n, XV, dtype).reshape(1, n)
    y, saved = cnorm.layer_norm_forward(x, n, backend="cython")
    g = Sums(range_counts(0, n, L))
    assert abs(float(saved.mean[0, 0]) - g.mean) < 1e-6 and abs(float(saved.rstd[0, 0]) / g.rstd - 1) < 1e-5
    idx = samples(n)
    tol = 1e-2 if dtype == FLOAT16 else 3e-2
    check(y.reshape(-1), idx, g.y(idx), tol, "y")
    del y
    gc.collect()
    dy = periodic(n, DV, dtype).reshape(1, n)
    dx, dw, db = cnorm.layer_norm_backward(dy, x, saved, np.ones(n, np.float32))
    check(dx.reshape(-1), idx, g.dx(idx), tol, "dx")
    xhat = (XV[idx % P] - g.mean) * g.rstd
    check(dw, idx, DV[idx % Q] * xhat, tol, "dweight")  # one row: dweight = dy·xhat


def test_layer_norm_rows_past_2_31():
    rows, c = (BIG + 4095) // 4096, 4096
    x = periodic(rows * c, XV, FLOAT16).reshape(rows, c)
    y, saved = cnorm.layer_norm_forward(x, c, backend="cython")
    idx = samples(rows * c)
    r_of = idx // c
    exp_y = np.array([Sums(range_counts(r * c, (r + 1) * c, L)).y(i) for r, i in zip(r_of, idx)])
    check(y.reshape(-1), idx, exp_y, 1e-2, "y")
    last = Sums(range_counts((rows - 1) * c, rows * c, L))
    assert abs(float(saved.mean[-1, 0]) - last.mean) < 1e-6
    del y
    gc.collect()
    dy = periodic(rows * c, DV, FLOAT16).reshape(rows, c)
    dx, dw, db = cnorm.layer_norm_backward(dy, x, saved)
    exp_dx = np.array([Sums(range_counts(r * c, (r + 1) * c, L)).dx(i) for r, i in zip(r_of, idx)])
    check(dx.reshape(-1), idx, exp_dx, 1e-2, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_channels_first_past_2_31(dtype):
    n_, c, s = 2, 3, (BIG + 5) // 6
    x = periodic(n_ * c * s, XV, dtype).reshape(n_, c, s)
    y, saved = cnorm.batch_norm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32), backend="cython")
    chans = []
    for ch in range(c):
        cnt = sum(range_counts((k * c + ch) * s, (k * c + ch + 1) * s, L) for k in range(n_))
        chans.append(Sums(cnt))
    np.testing.assert_allclose(saved.mean, [g.mean for g in chans], atol=1e-6)
    np.testing.assert_allclose(saved.rstd, [g.rstd for g in chans], rtol=1e-5)
    idx = samples(x.size)
    ch_of = (idx // s) % c
    tol = 1e-2 if dtype == FLOAT16 else 3e-2
    check(y.reshape(-1), idx, np.array([chans[k].y(i) for k, i in zip(ch_of, idx)]), tol, "y")
    del y
    gc.collect()
    dy = periodic(x.size, DV, dtype).reshape(x.shape)
    dx, dw, db = cnorm.batch_norm_backward(dy, x, saved, np.ones(c, np.float32))
    check(dx.reshape(-1), idx, np.array([chans[k].dx(i) for k, i in zip(ch_of, idx)]), tol, "dx")
    check_sums(db, [g.sd for g in chans], [g.abs_db for g in chans], "dbias")
    check_sums(dw, [g.dweight() for g in chans], [g.abs_dw for g in chans], "dweight")


def test_batch_norm_channels_last_past_2_31():
    c = 6
    rows = (BIG + c - 1) // c
    x = periodic(rows * c, XV, FLOAT16).reshape(rows, c)  # (N, C): the channels-last kernels
    y, saved = cnorm.batch_norm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32), backend="cython")
    chans = [Sums(ap_counts(ch, c, rows, L)) for ch in range(c)]
    np.testing.assert_allclose(saved.mean, [g.mean for g in chans], atol=1e-6)
    idx = samples(x.size)
    check(y.reshape(-1), idx, np.array([chans[i % c].y(i) for i in idx]), 1e-2, "y")
    del y
    gc.collect()
    dy = periodic(x.size, DV, FLOAT16).reshape(x.shape)
    dx, dw, db = cnorm.batch_norm_backward(dy, x, saved, np.ones(c, np.float32))
    check(dx.reshape(-1), idx, np.array([chans[i % c].dx(i) for i in idx]), 1e-2, "dx")
    check_sums(db, [g.sd for g in chans], [g.abs_db for g in chans], "dbias")
    check_sums(dw, [g.dweight() for g in chans], [g.abs_dw for g in chans], "dweight")


def test_group_norm_past_2_31():
    n_, c, g_, s = 2, 4, 2, (BIG + 7) // 8
    x = periodic(n_ * c * s, XV, FLOAT16).reshape(n_, c, s)
    y, saved = cnorm.group_norm_forward(x, g_, backend="cython")
    cg = c // g_
    groups = {(k, gi): Sums(range_counts((k * c + gi * cg) * s, (k * c + (gi + 1) * cg) * s, L))
              for k in range(n_) for gi in range(g_)}
    for (k, gi), g in groups.items():
        assert abs(float(saved.mean[k, gi]) - g.mean) < 1e-6
    idx = samples(x.size)
    key = [((i // (c * s)), ((i // s) % c) // cg) for i in idx]
    check(y.reshape(-1), idx, np.array([groups[k].y(i) for k, i in zip(key, idx)]), 1e-2, "y")
    del y
    gc.collect()
    dy = periodic(x.size, DV, FLOAT16).reshape(x.shape)
    dx, _, _ = cnorm.group_norm_backward(dy, x, saved)
    check(dx.reshape(-1), idx, np.array([groups[k].dx(i) for k, i in zip(key, idx)]), 1e-2, "dx")

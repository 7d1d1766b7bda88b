"""SyncBatchNorm cases shared by the in-process tests (ranks as threads) and the
MPI worker (ranks as processes): every rank holds a slice of one batch, and must
get what single-process cnorm BatchNorm gives that slice of the whole batch."""

from dataclasses import dataclass
from itertools import product

import numpy as np

import cnorm
from cnorm.distributed import sync_batch_norm_backward, sync_batch_norm_forward
from conftest import tolerance
from helpers import close, make_input

MOMENTUM, EPS = 0.1, 1e-5


@dataclass
class Case:
    """One batch split across ranks; arrays are the whole batch, rows are cut per rank."""

    name: str
    sizes: tuple
    x: np.ndarray
    dy: np.ndarray
    weight: object
    bias: object
    running_mean: np.ndarray
    running_var: np.ndarray
    channel_axis: int
    tol: float
    tol_dx: float

    def rows(self, rank):
        start = sum(self.sizes[:rank])
        return slice(start, start + self.sizes[rank])


def make_case(sizes, c=3, spatial=(4, 5), layout="cf", dtype=np.float64, affine=True, offset=0.0, seed=0):
    """A whole batch of sum(sizes) samples in ``layout`` ("cf", "cl" with channel_axis=-1, "cl_strided")."""
    rng = np.random.default_rng(seed)
    x = make_input(rng, (sum(sizes), c, *spatial), layout, dtype, offset=offset)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    rm = rng.standard_normal(c).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, c).astype(np.float32)
    # As in test_properties: a float32 mean near `offset` is only known to offset·eps/2,
    # which normalization and backward see relative to the channel's std.
    logical = np.moveaxis(x, -1, 1) if layout == "cl" else x
    var = logical.astype(np.float64).swapaxes(0, 1).reshape(c, -1).var(axis=1)
    std = float(np.sqrt(var.min() + EPS))
    tol = max(tolerance(dtype), 8 * abs(offset) * np.finfo(dtype).eps / std)
    # dx sees that error times rstd once more (dx ~ rstd·(dy - ... - xhat·mean(dy·xhat))):
    # channels of two values at 1e3 with std 0.03 differ by 0.06 between two exact paths
    tol_dx = tol * max(1.0, 1.0 / std)
    name = f"{layout}-{np.dtype(dtype).name}-{'affine' if affine else 'plain'}-{'x'.join(map(str, spatial))}"
    name += f"-offset{offset:g}-sizes{'_'.join(map(str, sizes))}"
    return Case(name, tuple(sizes), x, dy, w, b, rm, rv, -1 if layout == "cl" else 1, tol, tol_dx)


def grid(sizes):
    """The cases every rank count runs: layouts x dtypes x affine, a 2-D input, and |mean| >> std."""
    cases = [make_case(sizes, layout=layout, dtype=dtype, affine=affine, seed=i)
             for i, (layout, dtype, affine) in enumerate(product(("cf", "cl", "cl_strided"),
                                                                 (np.float64, np.float32), (True, False)))]
    cases.append(make_case(sizes, c=5, spatial=(), layout="cf", seed=99))  # BatchNorm1d on (N, C)
    cases.append(make_case(sizes, c=4, spatial=(3,), layout="cl", offset=1e4, seed=98))
    cases.append(make_case(sizes, c=4, spatial=(3,), layout="cf", dtype=np.float32, offset=1e3, seed=97))
    return cases


def run_rank(case, rank, comm, bc):
    """This rank's forward and backward on its rows with backend ``bc`` (a conftest.BackendCase).

    Returns the results as host arrays.
    """
    rows, A = case.rows(rank), bc.asarray
    x, dy, w = A(case.x[rows]), A(case.dy[rows]), A(case.weight)
    rm, rv = A(case.running_mean.copy()), A(case.running_var.copy())
    y, saved = sync_batch_norm_forward(x, w, A(case.bias), rm, rv, True, MOMENTUM, EPS, case.channel_axis,
                                       comm, bc.name)
    dx, dw, db = sync_batch_norm_backward(dy, x, saved, w)
    out = {"y": y, "dx": dx, "dweight": dw, "dbias": db, "running_mean": rm, "running_var": rv,
           "mean": saved.mean, "rstd": saved.rstd}
    return {k: bc.to_numpy(a) for k, a in out.items()}


def reference(case, bc):
    """Single-process cnorm BatchNorm on the whole batch, as host arrays."""
    A = bc.asarray
    rm, rv = A(case.running_mean.copy()), A(case.running_var.copy())
    y, saved = cnorm.batch_norm_forward(A(case.x), A(case.weight), A(case.bias), rm, rv, True, MOMENTUM, EPS,
                                        case.channel_axis, bc.name)
    dx, dw, db = cnorm.batch_norm_backward(A(case.dy), A(case.x), saved, A(case.weight))
    out = {"y": y, "dx": dx, "dweight": dw, "dbias": db, "running_mean": rm, "running_var": rv}
    return {k: bc.to_numpy(a) for k, a in out.items()}


def check_rank(case, rank, out, ref, dweight_sum, dbias_sum):
    """Assert that one rank's results are the whole batch's, restricted to its rows.

    ``dweight_sum``/``dbias_sum`` are the rank contributions summed over ranks
    (what a data-parallel gradient all-reduce forms).
    """
    rows, tol = case.rows(rank), case.tol
    what = f"{case.name} rank {rank}"
    for key, t in (("y", tol), ("dx", case.tol_dx)):
        assert out[key].shape == ref[key][rows].shape and out[key].dtype == case.x.dtype, f"{what}: {key}"
        close(out[key], ref[key][rows], t, f"{what}: {key}")
    close(out["running_mean"], ref["running_mean"], tol, f"{what}: running_mean")
    close(out["running_var"], ref["running_var"], tol, f"{what}: running_var")
    if case.weight is None:
        assert out["dweight"] is None and out["dbias"] is None, f"{what}: gradients of absent parameters"
    else:
        # A sum over every value of a channel: its rounding grows with their number.
        values_per_channel = case.x.size // case.running_mean.size
        sum_tol = tol * max(10, values_per_channel)
        close(dweight_sum, ref["dweight"], sum_tol, f"{what}: dweight summed over ranks")
        close(dbias_sum, ref["dbias"], sum_tol, f"{what}: dbias summed over ranks")

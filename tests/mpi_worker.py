"""One MPI rank of tests/test_mpi.py: ``mpiexec -n N python mpi_worker.py MODE N OUTDIR``.

Every rank writes what it found to ``OUTDIR/rank<r>.json``; the test reads all
of them. Modes:

match
    The SyncBatchNorm grid of tests/sync_cases.py on every CPU backend, plus
    the layer over training steps and precise_bn: each rank must equal
    single-process BatchNorm on the concatenated batch.
match-cupy
    The same with CuPy arrays on the "cupy" backend, every rank on the current
    GPU: the statistics go through MPI via host memory (reported as
    ``exchange``), and the reference is single-process cupy BatchNorm.
fail
    The last rank gets a bad input in several calls; every rank must raise,
    quickly, and the communicator must still work afterwards.
mismatch
    One rank's arguments are consistent but disagree with the other ranks'
    (4 channels where they have 3; a backward where they run a forward):
    every rank must raise, leave its running statistics alone, and stay in
    step.
uncaught
    Run under ``python -m mpi4py``: rank 1 raises an uncaught exception while
    the other ranks wait in a SyncBatchNorm forward, after writing
    ``OUTDIR/waiting<r>``; the job must end instead of hanging.
"""

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from mpi4py import MPI

import cnorm
import cnorm.nn as cnn
import sync_cases
from cnorm.distributed import PeerError, get_exchange, sync_batch_norm_backward, sync_batch_norm_forward
from conftest import BackendCase, tolerance
from helpers import close

SIZES = {1: (7,), 2: (5, 11), 3: (5, 0, 11)}
CPU_BACKENDS = [name for name in cnorm.available_backends() if name != "cupy"]


def rows(sizes, rank):
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def match_grid(comm, sizes, failures, backends):
    """The functional grid on each of ``backends``; returns how many cases ran."""
    ran = 0
    for name in backends:
        bc = BackendCase(name)
        for case in sync_cases.grid(sizes):
            out = sync_cases.run_rank(case, comm.rank, comm, bc)
            ref = sync_cases.reference(case, bc)
            dw = db = None
            if case.weight is not None:
                dw, db = comm.allreduce(out["dweight"]), comm.allreduce(out["dbias"])
            keys = ("running_mean", "running_var", "mean", "rstd")
            everyone = comm.allgather([out[k].tobytes() for k in keys])
            try:
                sync_cases.check_rank(case, comm.rank, out, ref, dw, db)
                for key, *theirs in zip(keys, *everyone):
                    assert len(set(theirs)) == 1, f"{name} {case.name}: {key} is not bit-identical across ranks"
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
            ran += 1
    return ran


def match_layer(comm, sizes, failures, bc=None):
    """SyncBatchNorm (channels-last, momentum=None) over 3 steps, eval, then precise_bn.

    ``bc`` (a conftest.BackendCase) builds both layers on that backend and
    feeds them its arrays; None keeps the default backend and NumPy arrays.
    Every rank makes the same collective calls whatever it finds: mismatches
    are recorded, not raised, so that no rank leaves the others waiting.
    """
    A, H = (bc.asarray, bc.to_numpy) if bc is not None else (np.asarray, np.asarray)
    rng = np.random.default_rng(11)
    c, mine = 4, rows(sizes, comm.rank)
    batches = [(rng.standard_normal((sum(sizes), 3, 2, c)) + 5, rng.standard_normal((sum(sizes), 3, 2, c)))
               for _ in range(3)]
    kw = dict(momentum=None, channel_axis=-1, dtype=np.float64, backend=None if bc is None else bc.name)
    ours, ref = cnn.SyncBatchNorm(c, **kw), cnn.BatchNorm2d(c, **kw)
    tol = tolerance(np.float64)

    def expect(actual, expected, what, scale=1):
        try:
            close(H(actual), H(expected), tol * scale, f"layer: {what}")
        except AssertionError as exc:
            failures.append(str(exc))

    for step, (x, dy) in enumerate(batches):
        y, y_ref = ours(A(x[mine])), ref(A(x))
        dx, dx_ref = ours.backward(A(dy[mine])), ref.backward(A(dy))
        expect(y, y_ref[mine], f"step {step} y")
        expect(dx, dx_ref[mine], f"step {step} dx")
        expect(comm.allreduce(H(ours.weight_grad)), ref.weight_grad, f"step {step} weight_grad summed", 10)
        expect(comm.allreduce(H(ours.bias_grad)), ref.bias_grad, f"step {step} bias_grad summed", 10)
    expect(ours.running_mean, ref.running_mean, "running_mean")
    expect(ours.running_var, ref.running_var, "running_var")
    expect(ours.eval()(A(batches[0][0][mine])), ref.eval()(A(batches[0][0]))[mine], "eval y")
    if int(ours.num_batches_tracked) != 3:
        failures.append(f"layer: num_batches_tracked {int(ours.num_batches_tracked)} != 3")
    # precise_bn: each rank runs two batches; the result covers every rank's.
    with cnn.precise_bn([ours]), cnn.precise_bn([ref]):
        for x, _ in batches[1:]:
            ours(A(x[mine]))
            ref(A(x))
    expect(ours.running_mean, ref.running_mean, "precise_bn running_mean")
    expect(ours.running_var, ref.running_var, "precise_bn running_var")
    if len(set(comm.allgather((H(ours.running_mean).tobytes(), H(ours.running_var).tobytes())))) != 1:
        failures.append("layer: precise_bn statistics differ across ranks")


def attempt(call):
    """Run a call that should fail: (error type, message, seconds)."""
    start = time.perf_counter()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"type": type(exc).__name__, "peer": isinstance(exc, PeerError), "message": str(exc),
                "seconds": time.perf_counter() - start}
    return {"type": None, "message": "no error", "seconds": time.perf_counter() - start}


def fail(comm):
    """Bad input on the last rank in four calls; after each, a good call must still work."""
    rank, size = comm.rank, comm.size
    bad = rank == size - 1
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 3, 5))
    xbad = x[:, :2] if bad else x
    w = np.ones(3)
    _, saved = sync_batch_norm_forward(x, w, comm=comm)
    dy_bad = np.ones((4, 3, 2)) if bad else np.ones_like(x)
    calls = {
        "forward": lambda: sync_batch_norm_forward(xbad, w, comm=comm),
        "backward": lambda: sync_batch_norm_backward(dy_bad, x, saved, w),
        "layer": lambda: cnn.SyncBatchNorm(3, comm=comm)(xbad),
    }
    if size > 1:  # with one rank there is nothing to disagree with
        calls["forward-unpinned"] = lambda: sync_batch_norm_forward(xbad, comm=comm)
    results = {}
    for what, call in calls.items():
        results[what] = attempt(call)
        y = sync_batch_norm_forward(x, w, comm=comm)[0]  # the communicator is still in step
        close(y, cnorm.batch_norm(np.concatenate([x] * size), w)[:4], 1e-12, f"good call after {what}")
    return results


def mismatch(comm):
    """The odd rank holds 4 channels where the others hold 3, in five kinds of call.

    The odd rank is rank 1 of 2 (with two ranks rank 0's value is the
    reference) and rank 0 of 3 (the majority's value is). After each call
    every rank runs a good forward, which must match whole-batch BatchNorm.
    """
    rank, size = comm.rank, comm.size
    odd = 0 if size >= 3 else size - 1
    c = 4 if rank == odd else 3
    rng = np.random.default_rng(13 + rank)
    x = rng.standard_normal((4, c, 5))
    x_good, w = np.random.default_rng(14).standard_normal((4, 3, 5)), np.ones(3)
    results = {"odd": odd}

    def record(what, call, buffers, layers=()):
        before = [np.array(b, copy=True) for b in buffers]
        got = attempt(call)
        got["untouched"] = all(np.array_equal(a, b) for a, b in zip(before, buffers))
        got["gradients"] = [layer.weight_grad is not None for layer in layers]
        results[what] = got
        y = sync_batch_norm_forward(x_good, w, comm=comm)[0]  # the communicator is still in step
        close(y, cnorm.batch_norm(np.concatenate([x_good] * size), w)[:4], 1e-12, f"good call after {what}")

    rm, rv = np.full(c, 0.5), np.full(c, 2.0)
    record("forward", lambda: sync_batch_norm_forward(x, np.ones(c), np.zeros(c), rm, rv, comm=comm), [rm, rv])
    record("forward-unpinned", lambda: sync_batch_norm_forward(x, comm=comm), [])
    bn = cnn.SyncBatchNorm(c, comm=comm, dtype=np.float64)
    record("layer", lambda: bn(x), [bn.running_mean, bn.running_var, bn.num_batches_tracked])
    # Two layers (3 and 4 channels) run forward on every rank; the odd rank differentiates them in the other order.
    layers = [cnn.SyncBatchNorm(k, comm=comm, dtype=np.float64) for k in (3, 4)]
    ys = [layer(rng.standard_normal((4, k, 5))) for layer, k in zip(layers, (3, 4))]
    first = 1 if rank == odd else 0
    record("backward", lambda: layers[first].backward(np.ones_like(ys[first])),
           [b for layer in layers for b in (layer.running_mean, layer.running_var)], layers)
    # Out of step: the odd rank differentiates a forward while the others run the next forward.
    y, saved = sync_batch_norm_forward(x_good, w, comm=comm)
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    if rank == odd:
        call = lambda: sync_batch_norm_backward(np.ones_like(y), x_good, saved, w)  # noqa: E731
    else:
        call = lambda: sync_batch_norm_forward(x_good, w, None, rm, rv, comm=comm)  # noqa: E731
    record("out-of-step", call, [rm, rv])
    return results


def uncaught(comm, outdir):
    """Rank 1 raises, uncaught; the others enter a collective that it never joins."""
    x = np.random.default_rng(comm.rank).standard_normal((4, 3, 5))
    sync_batch_norm_forward(x, comm=comm)  # every rank is up and in step
    if comm.rank == 1:
        raise RuntimeError("rank 1 ends with an uncaught exception")
    (outdir / f"waiting{comm.rank}").touch()
    sync_batch_norm_forward(x, comm=comm)  # waits for rank 1 until the job is aborted
    (outdir / f"left{comm.rank}").touch()  # never: the test fails if it finds this


def main():
    mode, expected, outdir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    comm = MPI.COMM_WORLD
    if mode == "uncaught":
        uncaught(comm, outdir)  # no try: the exception must reach python -m mpi4py
        return
    result = {"rank": comm.rank, "size": comm.size}
    if comm.size != expected:
        result["error"] = (f"launched {expected} ranks but this one sees COMM_WORLD of size {comm.size}: the "
                           f"mpiexec used does not belong to the MPI library mpi4py loaded "
                           f"({MPI.Get_library_version().splitlines()[0]})")
        (outdir / f"rank{comm.rank}.json").write_text(json.dumps(result))
        return
    try:
        if mode == "match":
            failures = []
            result["cases"] = match_grid(comm, SIZES[comm.size], failures, CPU_BACKENDS)
            match_layer(comm, SIZES[comm.size], failures)
            result["failures"] = failures
        elif mode == "match-cupy":
            why = cnorm.available_backends(with_reasons=True)["cupy"]
            if why:  # the test only launches this mode where cupy works: never pass without running
                raise RuntimeError(f"backend 'cupy' unavailable in this rank: {why}")
            import cupy

            result["device"] = cupy.cuda.Device().pci_bus_id
            result["exchange"] = type(get_exchange(comm, device=True)).__name__
            failures = []
            result["cases"] = match_grid(comm, SIZES[comm.size], failures, ["cupy"])
            match_layer(comm, SIZES[comm.size], failures, BackendCase("cupy"))
            result["failures"] = failures
        elif mode == "mismatch":
            result["calls"] = mismatch(comm)
        else:
            result["calls"] = fail(comm)
    except Exception:  # noqa: BLE001 - reported to the test
        result["error"] = traceback.format_exc()
    (outdir / f"rank{comm.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

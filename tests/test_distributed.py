"""SyncBatchNorm's protocol in one process: ranks are threads sharing an in-memory
Exchange, so the merge, the failure protocol and the layer run on every backend
without MPI (tests/test_mpi.py runs the same cases as real MPI processes)."""

import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cnorm
import cnorm.nn as cnn
from cnorm.distributed import (
    Exchange,
    PeerError,
    SyncBatchNorm,
    convert_sync_batchnorm,
    get_exchange,
    sync_batch_norm_backward,
    sync_batch_norm_forward,
)
from conftest import tolerance
from helpers import close, same_bits
import sync_cases


class MismatchedCollective(AssertionError):
    """Ranks entered different collectives, or one collective with different buffer sizes.

    MPI leaves this undefined: MPICH aborts the job on some ranks ("Message
    truncated") after others went on with garbage, NCCL hangs or reads out of
    bounds. The protocol must never let it happen, so the fake fails the test.
    """


class ThreadExchange(Exchange):
    """Rank ``rank`` of ``size`` threads; counts the collectives it takes part in.

    Every rank of a collective must make the same one (allgather or
    allreduce) with the same buffer size, as MPI requires; otherwise every
    rank raises :class:`MismatchedCollective`.
    """

    xp = np

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group["size"]
        self.calls = []

    def _collective(self, kind, buf):
        g = self.group
        self.calls.append(kind)
        g["slots"][self.rank] = (kind, np.array(buf, dtype=np.float64))
        g["barrier"].wait()
        posted = list(g["slots"])
        g["barrier"].wait()
        made = [(kind, b.shape) for kind, b in posted]
        if len(set(made)) > 1:
            raise MismatchedCollective(f"ranks made different collectives at once (in rank order): {made}")
        return np.stack([b for _, b in posted])

    def allgather(self, buf):
        return self._collective("allgather", buf)

    def allreduce_sum(self, buf):
        return self._collective("allreduce", buf).sum(axis=0)


class NoExchange(Exchange):
    """Fails the test on any communication."""

    def allgather(self, buf):
        raise AssertionError("communicated")

    allreduce_sum = allgather


def run_ranks(size, fn):
    """Run ``fn(rank, exchange)`` on ``size`` thread ranks; return each rank's ("ok", value) or ("error", exc)."""
    group = {"size": size, "slots": [None] * size, "barrier": threading.Barrier(size, timeout=20)}
    results = [None] * size

    def target(rank):
        try:
            results[rank] = ("ok", fn(rank, ThreadExchange(group, rank)))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[rank] = ("error", exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


def values(results):
    """The ranks' values, re-raising the first rank's error."""
    for status, value in results:
        if status == "error":
            raise value
    return [value for _, value in results]


def check_split(case, bc):
    """Run ``case`` on thread ranks and compare every rank with the whole batch."""
    outs = values(run_ranks(len(case.sizes), lambda r, ex: sync_cases.run_rank(case, r, ex, bc)))
    ref = sync_cases.reference(case, bc)
    dw = db = None
    if case.weight is not None:
        dw, db = sum(o["dweight"] for o in outs), sum(o["dbias"] for o in outs)
    for rank, out in enumerate(outs):
        sync_cases.check_rank(case, rank, out, ref, dw, db)
        for key in ("running_mean", "running_var", "mean", "rstd"):  # bit-identical everywhere
            assert np.array_equal(out[key], outs[0][key], equal_nan=True), f"{case.name}: {key} differs by rank"


@pytest.mark.parametrize("sizes", [(7,), (5, 11), (5, 0, 11), (0, 3, 0, 1)], ids=lambda s: "_".join(map(str, s)))
def test_ranks_match_whole_batch(backend, sizes):
    for case in sync_cases.grid(sizes):
        check_split(case, backend)


@st.composite
def splits(draw):
    ranks = draw(st.integers(1, 4))
    sizes = [draw(st.integers(0, 4)) for _ in range(ranks)]
    spatial = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 2))))
    if sum(sizes) * int(np.prod(spatial)) < 2:
        sizes[-1] += 2
    return dict(sizes=sizes, c=draw(st.integers(1, 5)), spatial=spatial,
                layout=draw(st.sampled_from(["cf", "cl", "cl_strided"])),
                dtype=draw(st.sampled_from([np.float32, np.float64])),
                affine=draw(st.booleans()), offset=draw(st.sampled_from([0.0, 1e3])),
                seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=splits())
# two values per channel at 1e3, std 0.03: dx is cancellation noise of rstd² · the float32 mean's rounding
@example(spec=dict(sizes=[2], c=5, spatial=(), layout="cf", dtype=np.float32, affine=False, offset=1000.0,
                   seed=83853))
def test_random_splits_match_whole_batch(backend, spec):
    check_split(sync_cases.make_case(**spec), backend)


def test_collectives_per_call():
    """A fixed-size handshake, then the data: forward two Allgathers, backward an Allgather and an Allreduce.

    A single rank skips the handshake; with no values on any rank there is no data to exchange.
    """
    case = sync_cases.make_case((3, 4))

    def step(rank, ex, **kw):
        x = case.x[case.rows(rank)]
        y, saved = sync_batch_norm_forward(x, case.weight, comm=ex, **kw)
        forward_calls = list(ex.calls)
        sync_batch_norm_backward(np.ones_like(y), x, saved, case.weight)
        return forward_calls, ex.calls[len(forward_calls):]

    for fwd, bwd in values(run_ranks(2, step)):
        assert fwd == ["allgather", "allgather"] and bwd == ["allgather", "allreduce"]
    no_params = run_ranks(2, lambda r, ex: sync_batch_norm_forward(case.x[case.rows(r)], comm=ex) and ex.calls)
    assert values(no_params) == [["allgather", "allgather"]] * 2
    for fwd, bwd in values(run_ranks(1, step)):
        assert fwd == ["allgather"] and bwd == ["allreduce"]

    def empty(rank, ex):
        x = case.x[:0]
        y, saved = sync_batch_norm_forward(x, comm=ex)
        sync_batch_norm_backward(y, x, saved)
        return ex.calls

    assert values(run_ranks(2, empty)) == [["allgather", "allgather"]] * 2


def test_every_rank_empty():
    """No values anywhere: empty outputs, running statistics untouched, zero gradients."""
    x = np.zeros((0, 3, 4))

    def step(rank, ex):
        rm, rv = np.full(3, 0.5), np.full(3, 2.0)
        y, saved = sync_batch_norm_forward(x, np.ones(3), np.zeros(3), rm, rv, comm=ex)
        dx, dw, db = sync_batch_norm_backward(np.zeros_like(x), x, saved, np.ones(3))
        return y.shape, rm, rv, dx.shape, dw, db

    for shape, rm, rv, dx_shape, dw, db in values(run_ranks(3, step)):
        assert shape == dx_shape == x.shape
        assert np.all(rm == 0.5) and np.all(rv == 2.0) and np.all(dw == 0) and np.all(db == 0)


def expect_everywhere(results, failing, error_type, match):
    """``failing`` ranks raised ``error_type`` matching ``match``; every other rank a PeerError naming them."""
    for rank, (status, exc) in enumerate(results):
        assert status == "error", f"rank {rank} did not raise"
        assert not isinstance(exc, threading.BrokenBarrierError), f"rank {rank} hung in a collective"
        if rank in failing:
            assert type(exc) is error_type, f"rank {rank}: {exc!r}"
            assert match in str(exc), f"rank {rank}: {exc}"
        else:
            assert isinstance(exc, PeerError), f"rank {rank}: {exc!r}"
            assert f"rank {failing[0]}" in str(exc) or f"{len(failing)} ranks" in str(exc), str(exc)


@pytest.mark.parametrize("pinned", ["weight", "num_features", "nothing"])
def test_wrong_channel_count_fails_every_rank(pinned):
    rng = np.random.default_rng(0)

    def step(rank, ex):
        x = rng.standard_normal((4, 5 if rank == 1 else 3, 2))
        kw = {"weight": dict(weight=np.ones(3)), "num_features": dict(num_features=3), "nothing": {}}[pinned]
        return sync_batch_norm_forward(x, comm=ex, **kw)

    results = run_ranks(3, step)
    if pinned == "nothing":  # no rank's own check fails: the handshake finds rank 1 out of line
        expect_everywhere(results, [1], ValueError,
                          "x: expected 3 channels on every rank (ranks 0, 2 of 3 have 3), got 5 on rank 1")
        assert "the channel count is 5 there but 3 on ranks 0, 2" in str(results[0][1])
    else:
        expect_everywhere(results, [1], ValueError, "expected 3 channels")
        assert "rank 1 has 5" in str(results[0][1])


def attempt(call):
    """The exception ``call()`` raised, or None."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - returned to the test
        return exc
    return None


def as_results(errors):
    """``run_ranks``-style results from each rank's error (None: it returned)."""
    return [("ok", None) if exc is None else ("error", exc) for exc in errors]


# (ranks, the ranks given 4 channels instead of 3, the ranks that must raise the ValueError, what they are told)
DISAGREEMENTS = [
    (2, [1], [1], "x: expected 3 channels on every rank (rank 0 of 2 has 3), got 4 on rank 1"),
    (2, [0], [1], "x: expected 4 channels on every rank (rank 0 of 2 has 4), got 3 on rank 1"),  # rank 0 decides
    (3, [0], [0], "x: expected 3 channels on every rank (ranks 1, 2 of 3 have 3), got 4 on rank 0"),  # the majority
    (3, [2], [2], "x: expected 3 channels on every rank (ranks 0, 1 of 3 have 3), got 4 on rank 2"),
    (4, [1, 2], [1, 2], "x: expected 3 channels on every rank (ranks 0, 3 of 4 have 3), got 4 on rank"),  # a tie
]


@pytest.mark.parametrize("how", ["functional", "unpinned", "layer"])
@pytest.mark.parametrize("size, given_4, odd, message", DISAGREEMENTS,
                         ids=[f"{d[0]}ranks-rank{'_'.join(map(str, d[1]))}has4" for d in DISAGREEMENTS])
def test_ranks_disagreeing_on_channel_count_all_raise_with_buffers_untouched(how, size, given_4, odd, message):
    """Each rank's arguments agree among themselves (x, weight, bias, running buffers: all 3 or all 4
    channels), so no rank's own checks fail; the data exchange, whose size depends on C, must not run
    (MPI aborts or returns garbage for mismatched sizes). Every rank raises, nothing is updated, and
    the communicator stays in step."""

    def step(rank, ex):
        rng = np.random.default_rng(rank)
        c = 4 if rank in given_4 else 3
        x = rng.standard_normal((4, c, 2))
        if how == "layer":
            bn = SyncBatchNorm(c, comm=ex, dtype=np.float64)
            bn.running_mean[...], bn.running_var[...] = 0.5, 2.0
            buffers = [bn.running_mean, bn.running_var, bn.num_batches_tracked]

            def call():
                return bn(x)
        elif how == "functional":
            buffers = [np.full(c, 0.5), np.full(c, 2.0)]

            def call():
                return sync_batch_norm_forward(x, np.ones(c), np.zeros(c), *buffers, comm=ex)
        else:
            buffers = []

            def call():
                return sync_batch_norm_forward(x, comm=ex)
        before = [b.copy() for b in buffers]
        error = attempt(call)
        untouched = all(np.array_equal(a, b) for a, b in zip(before, buffers))
        calls = list(ex.calls)
        x_good = rng.standard_normal((4, 3, 2))
        y = sync_batch_norm_forward(x_good, np.ones(3), comm=ex)[0]  # still in step
        return error, untouched, calls, (x_good, y)

    results = values(run_ranks(size, step))
    expect_everywhere(as_results(r[0] for r in results), odd, ValueError, message)
    for rank, (_, untouched, calls, _) in enumerate(results):
        assert untouched, f"rank {rank}: running statistics changed"
        assert calls == ["allgather"], f"rank {rank}: {calls} (only the handshake may run)"
    x_all = np.concatenate([r[3][0] for r in results])
    close(np.concatenate([r[3][1] for r in results]), cnorm.batch_norm(x_all, np.ones(3)), 1e-12, "y after")


@pytest.mark.parametrize("how", ["functional", "layer"])
@pytest.mark.parametrize("size, odd", [(2, [1]), (3, [0])])
def test_ranks_differentiating_different_forwards_all_raise(how, size, odd):
    """Two forwards (3, then 4 channels) succeed everywhere; the odd rank then differentiates them in the
    other order. Its ValueError says so, the others raise PeerError, no gradient is set, no buffer changes."""

    def step(rank, ex):
        rng = np.random.default_rng(rank)
        xs = [rng.standard_normal((4, c, 2)) for c in (3, 4)]
        if how == "layer":
            layers = [SyncBatchNorm(c, comm=ex, dtype=np.float64) for c in (3, 4)]
            ys = [layer(x) for layer, x in zip(layers, xs)]
            backwards = [lambda layer=layer, y=y: layer.backward(np.ones_like(y)) for layer, y in zip(layers, ys)]
            buffers = [b for layer in layers for b in (layer.running_mean, layer.running_var)]
        else:
            outs = [sync_batch_norm_forward(x, np.ones(x.shape[1]), comm=ex) for x in xs]
            backwards = [lambda x=x, y=y, saved=saved: sync_batch_norm_backward(np.ones_like(y), x, saved)
                         for x, (y, saved) in zip(xs, outs)]
            buffers = []
        before, n_calls = [b.copy() for b in buffers], len(ex.calls)
        error = attempt(backwards[1] if rank in odd else backwards[0])
        untouched = all(np.array_equal(a, b) for a, b in zip(before, buffers))
        grads = [layer.weight_grad for layer in layers] if how == "layer" else []
        return error, untouched, ex.calls[n_calls:], grads

    results = values(run_ranks(size, step))
    expect_everywhere(as_results(r[0] for r in results), odd, ValueError,
                      f"saved: rank {odd[0]} of {size} differentiates its synchronized forward call #2")
    for rank, (_, untouched, calls, grads) in enumerate(results):
        assert untouched and calls == ["allgather"] and all(g is None for g in grads), (rank, untouched, calls)


def test_backward_of_forwards_with_different_channel_counts_fails_every_rank():
    """Forward call #1 over two different exchanges (3 and 4 channels); each rank then differentiates
    one of them over the first exchange: the call numbers agree, the channel counts do not."""
    second = {"size": 2, "slots": [None] * 2, "barrier": threading.Barrier(2, timeout=20)}

    def step(rank, ex):
        rng = np.random.default_rng(rank)
        x3, x4 = rng.standard_normal((4, 3, 2)), rng.standard_normal((4, 4, 2))
        _, saved3 = sync_batch_norm_forward(x3, comm=ex)
        _, saved4 = sync_batch_norm_forward(x4, comm=ThreadExchange(second, rank))
        x, saved = (x4, saved4) if rank == 1 else (x3, saved3)
        return sync_batch_norm_backward(np.ones_like(x), x, saved, comm=ex)

    expect_everywhere(run_ranks(2, step), [1], ValueError,
                      "saved: expected the state of a forward with 3 channels on every rank (rank 0 of 2 has 3), "
                      "got one with 4 on rank 1")


def test_forward_on_one_rank_backward_on_another_fails_every_rank():
    """Ranks out of step (rank 1 differentiates while rank 0 runs the next forward): both raise at the
    handshake, and once back in step the communicator works."""

    def step(rank, ex):
        rng = np.random.default_rng(rank)
        x, w = rng.standard_normal((4, 3, 2)), np.ones(3)
        y, saved = sync_batch_norm_forward(x, w, comm=ex)
        if rank == 1:
            error = attempt(lambda: sync_batch_norm_backward(np.ones_like(y), x, saved, w))
        else:
            error = attempt(lambda: sync_batch_norm_forward(x, w, comm=ex))
        y, saved = sync_batch_norm_forward(x, w, comm=ex)
        sync_batch_norm_backward(np.ones_like(y), x, saved, w)
        return error

    results = values(run_ranks(2, step))
    expect_everywhere(as_results(results), [1], ValueError,
                      "sync_batch_norm_backward: rank 1 of 2 is out of step with the others: rank 0 of 2 has called "
                      "sync_batch_norm_forward")
    assert str(results[0]).startswith("sync_batch_norm_forward failed on rank 1 of 2: the call is "
                                      "sync_batch_norm_backward there but sync_batch_norm_forward on rank 0")


def test_other_bad_inputs_fail_every_rank():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 2))
    bad = {"dtype": (x.astype(np.int64), TypeError, "dtype"),
           "running buffer": (x, ValueError, "running_var")}
    for what, (xbad, error, match) in bad.items():
        def step(rank, ex):
            rv = np.ones(4) if (rank == 2 and what == "running buffer") else np.ones(3)
            return sync_batch_norm_forward(xbad if rank == 2 else x, np.ones(3), None, np.zeros(3), rv, comm=ex)

        expect_everywhere(run_ranks(3, step), [2], error, match)


def test_backward_error_fails_every_rank():
    x = np.random.default_rng(2).standard_normal((4, 3, 2))

    def step(rank, ex):
        y, saved = sync_batch_norm_forward(x, np.ones(3), comm=ex)
        dy = np.ones((4, 3, 5)) if rank == 0 else np.ones_like(y)
        return sync_batch_norm_backward(dy, x, saved, np.ones(3))

    expect_everywhere(run_ranks(2, step), [0], ValueError, "dy: expected shape")


def test_disagreeing_settings_and_single_value_fail_every_rank():
    x = np.random.default_rng(3).standard_normal((2, 3))
    eps = run_ranks(2, lambda r, ex: sync_batch_norm_forward(x, np.ones(3), eps=1e-5 * (r + 1), comm=ex))
    expect_everywhere(eps, [1], ValueError, "eps: expected the same value on every rank (rank 0 of 2 has 1e-05), "
                                            "got 2e-05")
    momentum = run_ranks(3, lambda r, ex: sync_batch_norm_forward(x, momentum=0.2 if r == 0 else 0.1, comm=ex))
    expect_everywhere(momentum, [0], ValueError, "momentum: expected the same value on every rank (ranks 1, 2 of 3 "
                                                 "have 0.1), got 0.2")
    one = run_ranks(3, lambda r, ex: sync_batch_norm_forward(x[: int(r == 1)], np.ones(3), comm=ex))
    for status, exc in one:
        assert status == "error" and "more than 1 value per channel over all ranks" in str(exc), exc
    # ... whereas a single value on one rank is fine when the others have more.
    values(run_ranks(2, lambda r, ex: sync_batch_norm_forward(x[: 1 + r], np.ones(3), comm=ex)))


def test_comm_stays_usable_after_a_failure():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3, 2))

    def step(rank, ex):
        with pytest.raises(ValueError):  # PeerError is a ValueError
            sync_batch_norm_forward(x[:, : 2 + rank], np.ones(3), comm=ex)
        return sync_batch_norm_forward(x[3 * rank : 3 * rank + 3], np.ones(3), comm=ex)[0]

    ys = values(run_ranks(2, step))
    close(np.concatenate(ys), cnorm.batch_norm(x, np.ones(3)), 1e-12, "y after a failure")


def test_eval_mode_does_not_communicate():
    x = np.random.default_rng(5).standard_normal((4, 3, 2))
    rm, rv = np.zeros(3), np.ones(3)
    y, saved = sync_batch_norm_forward(x, np.ones(3), np.zeros(3), rm, rv, training=False, comm=NoExchange())
    dx, dw, _ = sync_batch_norm_backward(np.ones_like(x), x, saved, np.ones(3))
    y_ref, s_ref = cnorm.batch_norm_forward(x, np.ones(3), np.zeros(3), rm, rv, training=False)
    dx_ref, dw_ref, _ = cnorm.batch_norm_backward(np.ones_like(x), x, s_ref, np.ones(3))
    close(y, y_ref, 1e-12, "y")
    close(dx, dx_ref, 1e-12, "dx")
    close(dw, dw_ref, 1e-12, "dweight")
    bn = SyncBatchNorm(3, comm=NoExchange(), dtype=np.float64).eval()
    close(bn(x), cnorm.batch_norm(x, running_mean=np.zeros(3), running_var=np.ones(3), training=False), 1e-12, "y")
    bn.backward(np.ones_like(x))
    bn.train().freeze()
    bn(x)


def test_saved_objects_are_not_interchangeable():
    x = np.random.default_rng(6).standard_normal((4, 3))
    _, plain = cnorm.batch_norm_forward(x)
    with pytest.raises(TypeError, match="SyncSaved"):
        sync_batch_norm_backward(x, x, plain)
    _, synced = values(run_ranks(1, lambda r, ex: sync_batch_norm_forward(x, comm=ex)))[0]
    with pytest.raises(ValueError, match="sync_batch_norm_forward"):
        cnorm.batch_norm_backward(x, x, synced)


# -- the layer -----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_layer_matches_batchnorm_on_whole_batch(backend, layout):
    """Three training steps with momentum=None (cumulative average), then eval."""
    sizes, c = (3, 0, 5), 4
    rng = np.random.default_rng(7)
    axis = -1 if layout == "cl" else 1
    shape = (sum(sizes), 5, 2, c) if layout == "cl" else (sum(sizes), c, 5, 2)
    batches = [(rng.standard_normal(shape) + 2, rng.standard_normal(shape)) for _ in range(3)]
    A, H = backend.asarray, backend.to_numpy
    kw = dict(momentum=None, channel_axis=axis, dtype=np.float64, backend=backend.name)
    ref = cnn.BatchNorm2d(c, **kw)
    ref.weight[...] = A(np.linspace(0.5, 1.5, c))

    def rows(rank):
        return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))

    def train(rank, ex):
        bn = SyncBatchNorm(c, comm=ex, **kw)
        bn.weight[...] = A(np.linspace(0.5, 1.5, c))
        out = []
        for x, dy in batches:
            y = bn(A(x[rows(rank)]))
            dx = bn.backward(A(dy[rows(rank)]))
            out.append((H(y), H(dx), H(bn.weight_grad), H(bn.bias_grad)))
        y_eval = H(bn.eval()(A(batches[0][0][rows(rank)])))
        return out, y_eval, H(bn.running_mean), H(bn.running_var), int(bn.num_batches_tracked)

    results = values(run_ranks(len(sizes), train))
    tol = tolerance(np.float64)
    for step, (x, dy) in enumerate(batches):
        y_ref = H(ref(A(x)))
        dx_ref = H(ref.backward(A(dy)))
        for rank, (out, *_rest) in enumerate(results):
            close(out[step][0], y_ref[rows(rank)], tol, f"step {step} y")
            close(out[step][1], dx_ref[rows(rank)], tol, f"step {step} dx")
        close(sum(r[0][step][2] for r in results), H(ref.weight_grad), tol * 10, "weight_grad summed")
        close(sum(r[0][step][3] for r in results), H(ref.bias_grad), tol * 10, "bias_grad summed")
    y_eval_ref = H(ref.eval()(A(batches[0][0])))
    for rank, (_, y_eval, rm, rv, nbt) in enumerate(results):
        close(y_eval, y_eval_ref[rows(rank)], tol, "eval y")
        close(rm, H(ref.running_mean), tol, "running_mean")
        close(rv, H(ref.running_var), tol, "running_var")
        assert nbt == 3
        assert np.array_equal(rm, results[0][2]) and np.array_equal(rv, results[0][3])


def test_layer_wrong_channels_fails_every_rank_in_training_only():
    x = np.random.default_rng(8).standard_normal((4, 3, 2, 2))

    def step(rank, ex):
        return SyncBatchNorm(3, comm=ex)(x[:, : 2 if rank == 2 else 3])

    expect_everywhere(run_ranks(3, step), [2], ValueError, "expected 3 channels")
    bn = SyncBatchNorm(3, comm=NoExchange()).eval()
    with pytest.raises(ValueError, match="expected 3 channels"):
        bn(x[:, :2])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bn(x[0, 0, 0])


def test_precise_bn_covers_every_rank():
    """Each rank records its own batches; the result is that of all of them, on every rank."""
    rng = np.random.default_rng(9)
    per_rank = [[rng.standard_normal((n, 3, 2)) * 3 + 1 for n in ns] for ns in ((4, 2), (0, 5), (3, 3))]

    def record(rank, ex):
        bn = SyncBatchNorm(3, comm=ex, dtype=np.float64)
        with cnn.precise_bn([bn]):
            for x in per_rank[rank]:
                bn(x)
        return bn.running_mean, bn.running_var

    results = values(run_ranks(3, record))
    ref = cnn.BatchNorm1d(3, dtype=np.float64)
    with cnn.precise_bn([ref]):
        for step in range(2):
            ref(np.concatenate([batches[step] for batches in per_rank]))
    everything = np.concatenate([x for batches in per_rank for x in batches])
    for rm, rv in results:
        assert np.array_equal(rm, results[0][0]) and np.array_equal(rv, results[0][1])
        close(rm, ref.running_mean, 1e-12, "precise running_mean")
        close(rv, ref.running_var, 1e-12, "precise running_var")
        close(rm, everything.mean(axis=(0, 2)), 1e-12, "mean of every value")
        close(rv, everything.transpose(1, 0, 2).reshape(3, -1).var(axis=1, ddof=1), 1e-12, "var of every value")


def test_convert_sync_batchnorm():
    bn2, bn1, gn = cnn.BatchNorm2d(4, momentum=None, channel_axis=-1), cnn.BatchNorm1d(3).eval(), cnn.GroupNorm(2, 4)
    frozen = cnn.FrozenBatchNorm2d(4)
    bn1.num_batches_tracked[...] = 7
    ex = NoExchange()
    converted = convert_sync_batchnorm([bn2, bn1, gn, frozen], comm=ex)
    assert [type(layer) for layer in converted] == [SyncBatchNorm, SyncBatchNorm, cnn.GroupNorm,
                                                    cnn.FrozenBatchNorm2d]
    s2, s1 = converted[:2]
    assert converted[2] is gn and converted[3] is frozen
    assert s2.weight is bn2.weight and s2.running_var is bn2.running_var and s2.comm is ex
    assert s2.momentum is None and s2.channel_axis == -1 and s2.training
    assert not s1.training and int(s1.num_batches_tracked) == 7
    assert s2.state_dict().keys() == bn2.state_dict().keys()
    assert convert_sync_batchnorm({"bn": bn2})["bn"].weight is bn2.weight
    assert type(cnn.convert_sync_batchnorm(bn2)) is cnn.SyncBatchNorm
    with pytest.raises(TypeError, match="layers"):
        convert_sync_batchnorm(3)
    with pytest.raises(TypeError, match="comm"):
        SyncBatchNorm(3, comm="world")


def test_missing_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"pip install .cnorm-kernels\[mpi\]."):
        get_exchange(None)
    with pytest.raises(ImportError, match=r"pip install .cnorm-kernels\[mpi\]."):
        SyncBatchNorm(3)(np.ones((4, 3)))


# -- out= ----------------------------------------------------------------------------

_same_bits = same_bits


OUT_CASES = [dict(layout="cf", dtype=np.float32, affine=True), dict(layout="cl_strided", dtype=np.float64,
                                                                       affine=False)]


@pytest.mark.parametrize("spec", OUT_CASES, ids=["cf-f32-affine", "cl_strided-f64-plain"])
def test_out_is_written_and_in_place_works(backend, spec):
    """sync_batch_norm_forward/backward with out=: a separate buffer, y over x, dx over dy and over x,
    each returned as out and bit-identical to the plain call on every rank (one rank empty). After a
    forward in place, backward refuses the overwritten x on every rank and takes the original."""
    sizes = (3, 0, 4)
    case = sync_cases.make_case(sizes, c=3, spatial=(2, 3), seed=5, **spec)
    A, H, xp = backend.asarray, backend.to_numpy, backend.xp

    def step(rank, ex):
        rows = case.rows(rank)
        w, b = A(case.weight), A(case.bias)

        def fresh():
            x = A(case.x[rows].copy(order="K"))
            dy = xp.empty_like(x)
            dy[...] = A(case.dy[rows])
            return x, dy

        def forward(x, **out):
            rm, rv = A(case.running_mean.copy()), A(case.running_var.copy())
            y, saved = sync_batch_norm_forward(x, w, b, rm, rv, True, sync_cases.MOMENTUM, sync_cases.EPS,
                                               case.channel_axis, ex, backend.name, **out)
            return y, saved, rm, rv

        x, dy = fresh()
        y, saved, rm, rv = forward(x)
        want_fwd = [H(a) for a in (y, rm, rv)]
        want_bwd = [H(a) for a in sync_batch_norm_backward(dy, x, saved, w)]

        def check_backward(got, what):
            for g, e, name in zip(got, want_bwd, ("dx", "dweight", "dbias")):
                _same_bits(H(g), e, f"rank {rank} {what}: {name}")

        x, dy = fresh()
        buf, dbuf = xp.empty_like(x), xp.empty_like(x)
        y, saved, rm, rv = forward(x, out=buf)
        assert y is buf
        for g, e, name in zip((y, rm, rv), want_fwd, ("y", "running_mean", "running_var")):
            _same_bits(H(g), e, f"rank {rank} out=buf: {name}")
        _same_bits(H(x), case.x[rows], f"rank {rank}: x untouched")
        got = sync_batch_norm_backward(dy, x, saved, w, out=dbuf)
        assert got[0] is dbuf
        check_backward(got, "dx into a buffer")

        x, dy = fresh()
        y, saved, rm, rv = forward(x, out=x)
        assert y is x
        _same_bits(H(y), want_fwd[0], f"rank {rank}: y over x")
        _same_bits(H(rm), want_fwd[1], f"rank {rank}: running_mean (in place)")
        refused = attempt(lambda: sync_batch_norm_backward(dy, x, saved, w))
        x0, _ = fresh()
        check_backward(sync_batch_norm_backward(dy, x0, saved, w), "after a forward in place")

        for target in ("dy", "x"):
            x, dy = fresh()
            _, saved, _, _ = forward(x)
            out = dy if target == "dy" else x
            got = sync_batch_norm_backward(dy, x, saved, w, out=out)
            assert got[0] is out
            check_backward(got, f"dx over {target}")
        return refused

    refusals = values(run_ranks(len(sizes), step))
    for rank, exc in enumerate(refusals):
        if sizes[rank]:  # its x holds y: refused, naming the in-place forward
            assert type(exc) is ValueError and "out=x" in str(exc), f"rank {rank}: {exc!r}"
        else:  # an empty x holds nothing to lose; it fails with the others
            assert isinstance(exc, PeerError), f"rank {rank}: {exc!r}"


def test_out_every_rank_empty_and_eval_mode():
    x = np.zeros((0, 3, 4))

    def step(rank, ex):
        out = np.empty_like(x)
        y, saved = sync_batch_norm_forward(x, comm=ex, out=out)
        dout = np.empty_like(x)
        dx = sync_batch_norm_backward(x, x, saved, out=dout)[0]
        return y is out and dx is dout

    assert values(run_ranks(2, step)) == [True, True]

    # eval mode: local, in place allowed, the overwritten x refused by backward
    rng = np.random.default_rng(21)
    x = rng.standard_normal((4, 3, 5))
    dy = rng.standard_normal(x.shape)
    rm, rv, w = np.zeros(3), np.full(3, 2.0), np.linspace(0.5, 1.5, 3)
    y_ref, s_ref = cnorm.batch_norm_forward(x, w, None, rm, rv, training=False)
    dx_ref = cnorm.batch_norm_backward(dy, x, s_ref, w)[0]
    xi = x.copy()
    y, saved = sync_batch_norm_forward(xi, w, None, rm, rv, training=False, comm=NoExchange(), out=xi)
    assert y is xi
    _same_bits(y, y_ref, "eval y over x")
    with pytest.raises(ValueError, match="out=x"):
        sync_batch_norm_backward(dy, xi, saved, w)
    dyi = dy.copy()
    dx = sync_batch_norm_backward(dyi, x, saved, w, out=dyi)[0]
    assert dx is dyi
    _same_bits(dx, dx_ref, "eval dx over dy")


# what is wrong with the one rank's out: (make it from x, error type, message)
# (zero-filled, not np.empty: "untouched" compares values, and uninitialized memory may hold NaNs)
BAD_OUTS = {
    "dtype": (lambda x: np.zeros(x.shape, np.float32), TypeError, "out: expected dtype float64"),
    "shape": (lambda x: np.zeros(x.shape[:-1]), ValueError, "out: expected shape"),
    "layout": (lambda x: np.zeros(x.shape[::-1]).T, ValueError, "out: expected a C-contiguous array"),
    "read-only": (lambda x: np.broadcast_to(np.zeros(1), x.shape), ValueError, "out: expected a writable"),
}


@pytest.mark.parametrize("what", list(BAD_OUTS))
def test_bad_out_on_one_rank_fails_every_rank_before_anything_is_written(what):
    """A bad out on rank 1 only: rank 1 raises the out error, the others a PeerError naming it, only the
    handshake collective runs, and no output, running statistic or gradient is written anywhere."""
    make_bad, error, match = BAD_OUTS[what]
    rng = np.random.default_rng(22)
    xs = [rng.standard_normal((4, 3, 5)) for _ in range(3)]

    def forward(rank, ex):
        x = xs[rank]
        rm, rv = np.zeros(3), np.ones(3)
        out = make_bad(x) if rank == 1 else np.full_like(x, 7.0)
        before = out.copy()
        exc = attempt(lambda: sync_batch_norm_forward(x, np.ones(3), None, rm, rv, comm=ex, out=out))
        untouched = np.array_equal(out, before) and not rm.any() and np.all(rv == 1)
        return exc, untouched, list(ex.calls)

    results = values(run_ranks(3, forward))
    expect_everywhere(as_results(r[0] for r in results), [1], error, match)
    assert all(untouched and calls == ["allgather"] for _, untouched, calls in results)

    def backward(rank, ex):
        x, dy = xs[rank], np.ones_like(xs[rank])
        _, saved = sync_batch_norm_forward(x, np.ones(3), comm=ex)
        n_calls = len(ex.calls)
        out = make_bad(x) if rank == 1 else np.full_like(x, 7.0)
        before = out.copy()
        exc = attempt(lambda: sync_batch_norm_backward(dy, x, saved, np.ones(3), out=out))
        return exc, np.array_equal(out, before), ex.calls[n_calls:]

    results = values(run_ranks(3, backward))
    expect_everywhere(as_results(r[0] for r in results), [1], error, match)
    assert all(untouched and calls == ["allgather"] for _, untouched, calls in results)


def test_out_overlapping_an_input_on_one_rank_fails_every_rank():
    rng = np.random.default_rng(23)

    def step(rank, ex):
        base = rng.standard_normal((5, 3, 2)) if rank == 0 else None
        x = base[:4] if rank == 0 else np.ones((4, 3, 2)) + rank
        out = base[1:] if rank == 0 else np.empty_like(x)
        return sync_batch_norm_forward(x, comm=ex, out=out)

    expect_everywhere(run_ranks(2, step), [0], ValueError, "out: overlaps x partly")

    def backward(rank, ex):
        x = np.random.default_rng(rank).standard_normal((4, 3, 2))
        _, saved = sync_batch_norm_forward(x, comm=ex)
        w = np.ones(3)
        out = np.empty_like(x)
        return sync_batch_norm_backward(np.ones_like(x), x, saved, out[0, :, 0] if rank == 1 else w, out=out)

    expect_everywhere(run_ranks(2, backward), [1], ValueError, "out: shares memory with weight")


def test_layer_out_and_in_place_on_one_rank():
    """SyncBatchNorm(x, out=) and backward(dy, out=) give the plain layer's bits and return out; a
    forward in place on rank 0 only makes its backward raise there, and the other rank a PeerError
    (the refusal goes through the backward's handshake: no rank is left waiting)."""
    rng = np.random.default_rng(24)
    xs = [rng.standard_normal((n, 3, 2, 2)) + 1 for n in (3, 5)]
    dys = [rng.standard_normal(x.shape) for x in xs]

    def step(rank, ex):
        x, dy = xs[rank], dys[rank]
        plain = SyncBatchNorm(3, comm=ex, dtype=np.float64)
        y_ref, dx_ref = plain(x).copy(), plain.backward(dy).copy()
        bn = SyncBatchNorm(3, comm=ex, dtype=np.float64)
        buf, dyc = np.empty_like(x), dy.copy()
        assert bn(x, out=buf) is buf and bn.backward(dyc, out=dyc) is dyc
        _same_bits(buf, y_ref, "y")
        _same_bits(dyc, dx_ref, "dx over dy")
        _same_bits(bn.weight_grad, plain.weight_grad, "weight_grad")
        _same_bits(bn.running_mean, plain.running_mean, "running_mean")
        xc = x.copy()
        bn(xc, out=xc if rank == 0 else None)  # collective: runs on every rank
        return attempt(lambda: bn.backward(dy)), list(ex.calls)

    results = values(run_ranks(2, step))
    expect_everywhere(as_results(r[0] for r in results), [0], ValueError,
                      "SyncBatchNorm.backward: the last forward wrote its output over its input (out=x)")
    assert results[0][1] == results[1][1]  # the same collectives on both ranks


def test_layer_bad_out_on_one_rank_fails_every_rank():
    x = np.random.default_rng(25).standard_normal((4, 3, 2))

    def step(rank, ex):
        bn = SyncBatchNorm(3, comm=ex, dtype=np.float64)
        out = np.empty(x.shape, np.float32) if rank == 1 else np.empty_like(x)
        exc = attempt(lambda: bn(x, out=out))
        return exc, int(bn.num_batches_tracked), bn.running_mean.copy()

    results = values(run_ranks(2, step))
    expect_everywhere(as_results(r[0] for r in results), [1], TypeError, "out: expected dtype float64")
    assert all(n == 0 and not rm.any() for _, n, rm in results)

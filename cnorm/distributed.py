"""SyncBatchNorm: BatchNorm whose statistics span every process's batch.

Data-parallel training splits a batch across processes ("ranks"); plain
BatchNorm then normalizes each rank's slice with that slice's statistics.
:func:`sync_batch_norm_forward` and :func:`sync_batch_norm_backward` instead
compute the statistics, and their gradients, of the whole batch, so every rank
gets exactly the result that BatchNorm gives on the concatenated batch. They
reuse the backend's cross-sample primitives (docs/architecture.md, §2) around one data
collective each, opened by a small handshake (below): there is no second copy
of the BatchNorm maths.

Forward: each rank computes per-channel ``(mean, M2)`` of its slice
(:meth:`~cnorm.backends.base.Backend.channel_stats`), the ranks exchange them
in **one Allgather** of a packed float64 buffer (their counts travelled in the
handshake), and every rank merges the table in rank order with Chan's k-way
formula::

    N    = Σ_r n_r
    mean = Σ_r n_r·mean_r / N
    M2   = Σ_r M2_r + Σ_r n_r·(mean_r − mean)²

An Allgather rather than an Allreduce of shifted sums, because:

* the merged statistics are **bit-identical on every rank** (the same
  operations on the same table), so running statistics never drift apart;
  MPI does not promise that an Allreduce returns the same bits everywhere;
* Chan's merge of centred partials keeps full accuracy when ``|mean| ≫ std``
  (docs/architecture.md, §5); shifted sums need a good common shift, known only after an
  exchange;
* ranks may hold different batch sizes, including zero: a rank's weight in
  the merge is its count.

The table is ``size × 2C`` doubles — a few KB for C ≤ 1024 even on dozens of
ranks, latency-bound like an Allreduce of the same buffer (PyTorch's
SyncBatchNorm makes the same trade).

Backward: per-channel ``(Σ dy, Σ dy·xhat)`` of the local slice
(:meth:`~cnorm.backends.base.Backend.channel_grad_sums`) are summed over
ranks with **one Allreduce**, then
:meth:`~cnorm.backends.base.Backend.channel_backward_apply` forms dx with the
global means. ``dweight`` and ``dbias`` are this rank's **local** sums, as in
PyTorch: summing them over ranks (the all-reduce every data-parallel loop
already does for every parameter) gives the gradient of the whole batch, so a
converted model needs no special case in its gradient exchange.

Handshake and failure behaviour: the data collective's size depends on C,
and MPI does not survive ranks that disagree on a collective's size (MPICH
aborts the job with "Message truncated" after other ranks went on with
garbage; NCCL hangs or reads out of bounds). So every collective call opens
with a **handshake**: one Allgather of 7 doubles per rank, the same size
whatever the arguments, carrying this rank's status (its own argument checks
and local statistics passed or not), the operation (training forward or
backward), the number of the forward call over this transport (the backward
sends the one it differentiates), the channel count, and the forward's count,
``eps`` and ``momentum`` (the backward sends the forward's global count
instead). From the same table every rank takes the same decision, before
any output or buffer is written:

* a rank whose own checks failed raises its own ``TypeError``/``ValueError``;
  every other rank raises a :class:`PeerError` naming it;
* else, slot by slot (operation, call number, channel count, then ``eps`` and
  ``momentum``, or the global count), the value most ranks hold is the
  reference — a tie goes to the value first in rank order, so with two ranks
  rank 0's value is the reference and rank 1 is the one that mismatches. The
  ranks that differ raise a ``ValueError`` naming the argument (``x: expected
  3 channels on every rank (rank 0 of 2 has 3), got 4 on rank 1 ...``), the
  others a :class:`PeerError` naming them.

Only then does the data collective run, with a size every rank agreed on.
No rank waits forever, no output is returned and no running statistic is
updated on any rank, and the communicator stays usable. The cost is that
second, small collective in each direction (a single rank skips it).

What the handshake cannot catch: a rank that makes no collective call at all
while the others do — eval mode does not communicate, so ranks that disagree
on ``training`` (or on which layers are frozen) leave the others waiting, or
pair calls that do not belong together. Every rank must make the same
sequence of synchronized calls: that is the contract of any collective.

Launching: an exception that is not caught on one rank — raised anywhere in
the script, not only by cnorm — ends that process, while the other ranks
wait in their next collective for a partner that never comes: the job hangs
until it is killed. Launch scripts with ``mpiexec -n N python -m mpi4py
script.py`` rather than ``mpiexec -n N python script.py``: mpi4py then runs
the script, and when it ends with an uncaught exception on any rank, prints
the traceback and calls ``MPI_Abort`` on ``COMM_WORLD``, which ends every rank
of the job.

Transports (``comm``): an ``mpi4py`` communicator (default
``MPI.COMM_WORLD``; install with ``pip install "cnorm-kernels[mpi]"``); for CuPy arrays
over MPI, NCCL (``cupy.cuda.nccl``) is used automatically when every rank has
its own GPU, else the statistics go through host memory; or any
:class:`Exchange` (e.g. :class:`NCCLExchange` built on an existing
``cupy.cuda.nccl.NcclCommunicator``).
"""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping

import numpy as np

from . import _validate as v
from ._layout import channel_view
from .backends import get_backend_instance, is_cupy_array, resolve
from .backends.base import stats_dtype
from .functional import (
    Saved,
    _affine,
    _backward,
    _channel_setup,
    _check_backward,
    _check_out,
    _problem,
    _update_running,
    batch_norm_forward,
)
from .nn import BatchStats, FrozenBatchNorm2d, _BatchNorm, _Layer

__all__ = [
    "SyncBatchNorm", "convert_sync_batchnorm",
    "Exchange", "MPIExchange", "NCCLExchange", "PeerError", "SyncSaved",
    "get_exchange", "nccl_exchange_from_mpi",
    "sync_batch_norm", "sync_batch_norm_forward", "sync_batch_norm_backward",
]

MPI_HINT = "pip install 'cnorm-kernels[mpi]'  (installs mpi4py and the mpich wheel, which provides mpiexec)"

# The handshake that opens every collective call: one Allgather of _SLOTS float64 values, the same
# size on every rank whatever its arguments (see "Handshake and failure behaviour" above).
_STATUS, _OP, _CALL, _CHANNELS, _COUNT, _EPS, _MOMENTUM = range(7)
_SLOTS = 7
_FAILED = 1.0
_FORWARD, _BACKWARD = 1.0, 2.0
_OP_NAMES = {_FORWARD: "sync_batch_norm_forward", _BACKWARD: "sync_batch_norm_backward"}


class PeerError(ValueError):
    """Another rank's arguments failed their checks in a synchronized call.

    Raised on every rank whose own input was fine, so that a bad input on one
    rank stops all of them instead of leaving them waiting in a collective.
    The failing rank raises its own, more specific error.
    """


def import_mpi():
    """Return ``mpi4py.MPI``, or raise an ImportError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"SyncBatchNorm over MPI needs mpi4py, which is not installed: {MPI_HINT}") from exc
    except (RuntimeError, OSError) as exc:  # mpi4py is there, but no MPI library it can load
        raise ImportError(f"mpi4py could not load an MPI library ({exc}): {MPI_HINT}") from exc
    return MPI


def _to_host(a):
    """A NumPy float64 array with the values of ``a`` (a NumPy or CuPy array)."""
    if is_cupy_array(a):
        a = a.get()
    return np.ascontiguousarray(a, dtype=np.float64)


def _to_module(xp, a):
    """``a`` as a float64 array of module ``xp`` (copies across devices only)."""
    if xp is np:
        return _to_host(a)
    return xp.ascontiguousarray(xp.asarray(a), dtype=xp.float64)


# -- transports --------------------------------------------------------------------

class Exchange:
    """The two collectives SyncBatchNorm needs, over one transport.

    Subclasses set :attr:`rank`, :attr:`size` and :attr:`xp` (the array module
    their buffers live in) and implement :meth:`allgather` and
    :meth:`allreduce_sum`. Every rank must call them in the same order.
    """

    rank = 0
    size = 1
    xp = np

    def allgather(self, buf):
        """Gather a 1-D float64 buffer from every rank; return shape ``(size, len(buf))`` in rank order."""
        raise NotImplementedError

    def allreduce_sum(self, buf):
        """Elementwise sum of a 1-D float64 buffer over every rank; the same result on every rank."""
        raise NotImplementedError


class MPIExchange(Exchange):
    """Collectives over an ``mpi4py`` communicator, through host memory.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        An intracommunicator; every rank of it must make the same calls.
    """

    xp = np

    def __init__(self, comm):
        self._mpi = import_mpi()
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allgather(self, buf):
        send = _to_host(buf)
        out = np.empty((self.size, send.size), dtype=np.float64)
        self.comm.Allgather(send, out)
        return out

    def allreduce_sum(self, buf):
        send = _to_host(buf)
        out = np.empty_like(send)
        self.comm.Allreduce(send, out, op=self._mpi.SUM)
        return out


class NCCLExchange(Exchange):
    """Collectives over a ``cupy.cuda.nccl.NcclCommunicator``, in device memory.

    The buffers are enqueued on CuPy's current stream, so they are ordered
    with the kernels that produced and consume them.

    Parameters
    ----------
    nccl_comm : cupy.cuda.nccl.NcclCommunicator
        One rank's communicator, on the current device.
    """

    def __init__(self, nccl_comm):
        import cupy
        from cupy.cuda import nccl

        self._cupy, self._nccl = cupy, nccl
        self.comm = nccl_comm
        self.rank = nccl_comm.rank_id()
        self.size = nccl_comm.size()
        self.xp = cupy

    def allgather(self, buf):
        cp = self._cupy
        send = cp.ascontiguousarray(cp.asarray(buf), dtype=cp.float64)
        out = cp.empty((self.size, send.size), dtype=cp.float64)
        stream = cp.cuda.get_current_stream().ptr
        self.comm.allGather(send.data.ptr, out.data.ptr, send.size, self._nccl.NCCL_FLOAT64, stream)
        return out

    def allreduce_sum(self, buf):
        cp = self._cupy
        send = cp.ascontiguousarray(cp.asarray(buf), dtype=cp.float64)
        out = cp.empty_like(send)
        stream = cp.cuda.get_current_stream().ptr
        self.comm.allReduce(send.data.ptr, out.data.ptr, send.size, self._nccl.NCCL_FLOAT64,
                            self._nccl.NCCL_SUM, stream)
        return out


def nccl_exchange_from_mpi(comm=None):
    """Create an :class:`NCCLExchange` spanning the ranks of an MPI communicator.

    Collective over ``comm``: rank 0 makes the NCCL unique id and broadcasts
    it. Each rank must have selected its own GPU (``cupy.cuda.Device(i).use()``)
    first; NCCL refuses two ranks on one device.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    NCCLExchange
    """
    comm = import_mpi().COMM_WORLD if comm is None else comm
    from cupy.cuda import nccl

    uid = nccl.get_unique_id() if comm.Get_rank() == 0 else None
    uid = comm.bcast(uid, root=0)
    return NCCLExchange(nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank()))


def _device_exchange(comm) -> Exchange:
    """NCCL when every rank of ``comm`` has its own GPU and NCCL, else MPI via host memory.

    Collective: all ranks gather (host, GPU bus id, NCCL available) and take
    the same decision from the same table.
    """
    try:
        import cupy
        from cupy.cuda import nccl  # noqa: F401

        nccl_ok = bool(getattr(cupy.cuda, "nccl_enabled", True))
        device = cupy.cuda.Device().pci_bus_id
    except Exception:  # noqa: BLE001 - no usable NCCL on this rank: fall back, decided collectively
        nccl_ok, device = False, None
    everyone = comm.allgather((socket.gethostname(), device, nccl_ok))
    own_gpus = all(ok for _, _, ok in everyone) and len({(h, d) for h, d, _ in everyone}) == len(everyone)
    if own_gpus and len(everyone) > 1:
        return nccl_exchange_from_mpi(comm)
    return MPIExchange(comm)


_EXCHANGES: dict = {}


def get_exchange(comm=None, device: bool = False) -> Exchange:
    """The :class:`Exchange` for ``comm``, created on first use and then reused.

    Parameters
    ----------
    comm : Exchange, mpi4py.MPI.Comm, cupy.cuda.nccl.NcclCommunicator or None
        None means ``mpi4py.MPI.COMM_WORLD``.
    device : bool
        The arrays are CuPy arrays: over MPI, pick NCCL when every rank has its
        own GPU (a collective, once per communicator), else host memory.

    Returns
    -------
    Exchange

    Raises
    ------
    ImportError
        ``comm`` is None or an MPI communicator and mpi4py is missing.
    TypeError
        ``comm`` is none of the above.
    """
    if isinstance(comm, Exchange):
        return comm
    if comm is None:
        comm = import_mpi().COMM_WORLD
    key = (id(comm), bool(device))
    if key in _EXCHANGES:
        return _EXCHANGES[key][1]
    root = type(comm).__module__.split(".")[0]
    if root == "mpi4py":
        exchange = _device_exchange(comm) if device else MPIExchange(comm)
    elif root in ("cupy", "cupy_backends") and hasattr(comm, "allGather"):
        exchange = NCCLExchange(comm)
    else:
        raise TypeError(
            f"comm: expected an mpi4py communicator, a cupy.cuda.nccl.NcclCommunicator or a "
            f"cnorm.distributed.Exchange, got {v.type_name(comm)}"
        )
    _EXCHANGES[key] = (comm, exchange)  # keeps comm alive, so its id is not reused
    return exchange


# -- agreement and failure protocol ------------------------------------------------

def _ranks(ranks) -> str:
    """"rank 2" or "ranks 0, 2"."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _who(failed_ranks) -> str:
    if len(failed_ranks) == 1:
        return f"rank {failed_ranks[0]}"
    return f"{len(failed_ranks)} ranks ({', '.join(map(str, failed_ranks))})"


def _majority(values):
    """``(reference, odd)``: the value most ranks hold and the ranks whose value differs from it.

    A tie goes to the value that comes first in rank order: with two ranks,
    rank 0's value is the reference and rank 1 is the one that mismatches.
    """
    tally: dict = {}
    for value in values:
        tally[value] = tally.get(value, 0) + 1
    most = max(tally.values())
    reference = next(value for value in values if tally[value] == most)
    return reference, [r for r, value in enumerate(values) if value != reference]


def _raise_everywhere(ex: Exchange, own_error, who: str, where: str, details: str = ""):
    """Raise on every rank once a collective showed that ranks (``who``, "" for none) failed."""
    if not who:
        return
    if own_error is not None:
        note = f"[{where}: raised on rank {ex.rank} of {ex.size}; every rank of the communicator raised too]"
        if hasattr(own_error, "add_note"):
            own_error.add_note(note)
        raise own_error
    raise PeerError(
        f"{where} failed on {who} of {ex.size}{details}; this rank's arguments passed their checks, and it "
        f"raises too so that no rank waits forever (the failing rank raised its own error)"
    )


# What each handshake slot is, for the messages: (how a PeerError names it, how to print a value).
_SLOT_TEXT = {
    _OP: ("the call", lambda value: _OP_NAMES.get(value, f"operation {value:g}")),
    _CALL: ("the synchronized forward call number", lambda value: f"#{int(value)}"),
    _CHANNELS: ("the channel count", lambda value: str(int(value))),
    _COUNT: ("the forward's values per channel over all ranks", lambda value: str(int(value))),
    _EPS: ("eps", repr),
    _MOMENTUM: ("momentum", repr),
}


def _next_forward(ex: Exchange) -> int:
    """The number the next synchronized forward over ``ex`` gets: 1, 2, ...

    Only forwards whose handshake passed count (:func:`_count_forward`): that
    outcome is the same on every rank, so ranks in step number their forwards
    alike even after failed calls, and the backward can check that every rank
    differentiates the same forward.
    """
    return getattr(ex, "_cnorm_forwards", 0) + 1


def _count_forward(ex: Exchange, call: int):
    ex._cnorm_forwards = call


def _handshake(ex: Exchange, mine, own_error, checks, mismatch):
    """Open a collective call: agree on everything the data collective depends on, or raise on every rank.

    ``mine`` is this rank's ``_SLOTS`` values. One Allgather of them (the
    same size on every rank, whatever its arguments); then, from the same
    table on every rank: if any rank failed its own checks, that rank raises
    its ``own_error`` and the others a :class:`PeerError`; else, for each slot
    of ``(_OP, _CALL, _CHANNELS, *checks)`` in turn, the ranks whose value
    differs from the majority's (:func:`_majority`) raise a ValueError with
    the message ``mismatch(slot, reference, holders)``, the others a
    PeerError. A single rank skips the Allgather.

    Returns
    -------
    numpy.ndarray of shape (size, _SLOTS)
        Every rank's values, in rank order.
    """
    where = _OP_NAMES[mine[_OP]]
    if ex.size == 1:
        table = np.asarray(mine, dtype=np.float64).reshape(1, _SLOTS)
    else:
        table = _to_host(ex.allgather(_to_module(ex.xp, mine)))
    agreed = (_OP, _CALL, _CHANNELS, *checks)
    rows = table.tolist()  # plain floats: for a few values per rank, faster than NumPy's comparisons
    first = rows[0]
    if all(row[_STATUS] != _FAILED and all(row[s] == first[s] for s in agreed) for row in rows):
        return table  # the usual case
    failed = [r for r in range(ex.size) if table[r, _STATUS] == _FAILED]
    if failed:
        ok = [r for r in range(ex.size) if r not in failed]
        details = ""
        if ok and mine[_OP] == _FORWARD:
            c, _ = _majority(table[ok, _CHANNELS].tolist())
            wrong = [f"rank {r} has {int(table[r, _CHANNELS])}" for r in failed if table[r, _CHANNELS] not in (-1, c)]
            details = f" (x must have {int(c)} channels; {', '.join(wrong)})" if wrong else ""
        _raise_everywhere(ex, own_error, _who(failed), where, details)
    for slot in agreed:
        values = table[:, slot].tolist()
        reference, odd = _majority(values)
        if not odd:
            continue
        holders = [r for r, value in enumerate(values) if value == reference]
        if ex.rank in odd:
            raise ValueError(mismatch(slot, reference, holders))
        what, show = _SLOT_TEXT[slot]
        theirs = (f"{show(values[odd[0]])} there" if len(odd) == 1
                  else ", ".join(f"{show(values[r])} on rank {r}" for r in odd))
        raise PeerError(
            f"{where} failed on {_who(odd)} of {ex.size}: {what} is {theirs} but {show(reference)} on "
            f"{_ranks(holders)}; this rank agrees with {_ranks(holders)}, and raises too so that no rank waits "
            f"forever (the mismatching rank raised a ValueError)"
        )
    return table


def _channels_of(x, channel_axis) -> int:
    """x's channel count, or -1 when x or channel_axis is unusable (only to describe a failure)."""
    try:
        return int(x.shape[v.check_channel_axis(channel_axis, x.ndim)])
    except Exception:  # noqa: BLE001 - any malformed input just has no channel count
        return -1


def _declared_channels(num_features, weight, bias, running_mean, running_var):
    """The channel count this rank's arguments other than x declare, or None when none does."""
    if num_features is not None:
        return v.check_int("num_features", num_features)
    for a in (weight, bias, running_mean, running_var):
        if a is not None:
            return int(math.prod(np.shape(a)))
    return None


# -- SyncBatchNorm -----------------------------------------------------------------

class SyncSaved(Saved):
    """:class:`~cnorm.functional.Saved` plus what the synchronized backward needs.

    Attributes
    ----------
    count : int
        Values per channel over every rank (training) or this rank (eval).
    exchange : Exchange or None
        The transport forward used; None in eval mode (no communication).
    call : int
        Which of this rank's synchronized forward calls over ``exchange`` it
        was (1, 2, ...; 0 in eval mode): the backward's handshake checks that
        every rank differentiates the same one.
    """

    __slots__ = ("count", "exchange", "call")

    def __init__(self, problem, view, mean, rstd, batch_stats, has_bias, backend, param_shape, dtype,
                 count, exchange, call=0):
        super().__init__("sync_batch_norm", problem, view, mean, rstd, batch_stats, has_bias, backend,
                         param_shape, dtype)
        self.count, self.exchange, self.call = count, exchange, call


def _sync_saved(saved: Saved, count: int, exchange) -> SyncSaved:
    """Re-label a batch_norm_forward result as a synchronized one."""
    synced = SyncSaved(saved.problem, saved.view, saved.mean, saved.rstd, saved.batch_stats, saved.has_bias,
                       saved.backend, saved.param_shape, saved.dtype, count, exchange)
    synced.overwritten = saved.overwritten
    return synced


class _Local:
    """One rank's validated input (and ``out=``) and partial statistics.

    ``overwritten`` is ``out`` when it is x itself (in place), else None.
    """

    def __init__(self, x, weight, bias, running_mean, running_var, eps, momentum, channel_axis, backend,
                 declared, out=None):
        be = resolve(backend, (x, weight, bias, running_mean, running_var))
        x = v.check_array("x", x, be, ndim_min=2)
        axis = v.check_channel_axis(channel_axis, x.ndim)
        self.c_x = x.shape[axis]
        if declared is not None and self.c_x != declared:
            raise ValueError(
                f"x: expected {declared} channels on channel_axis={channel_axis} (the channel count every "
                f"rank uses), got shape {tuple(x.shape)}"
            )
        be, x, axis, c = _channel_setup(x, weight, bias, channel_axis, backend, (running_mean, running_var))
        v.check_running(running_mean, running_var, (c,), be, required=False, why="")
        self.eps, self.momentum = v.check_eps(eps), v.check_momentum(momentum)
        self.be, self.c = be, c
        self.view = channel_view(x, axis)
        # out is checked here, inside the try of _sync_forward: a bad out on one rank then fails
        # every rank through the handshake, like the other argument errors, before anything is written.
        self.overwritten = _check_out(out, be, x, self.view, weight, bias, running_mean, running_var)
        self.p = _problem(self.view, 0)
        self.count = self.p.n * self.p.s
        self.x3 = None
        if self.count:
            self.x3 = self.view.to3(x, be.xp)
            mean, var = be.channel_stats(self.x3, self.p)
            self.mean = mean.astype(be.xp.float64)
            self.m2 = var.astype(be.xp.float64) * self.count
        else:  # an empty rank weighs nothing in the merge; its mean must not be NaN
            self.mean = self.m2 = np.zeros(c)


def _merge(xp, table, counts, c: int):
    """Chan's k-way merge of the gathered rows ``(mean, M2)`` with the ranks' ``counts``, in rank order.

    Returns ``(N, mean, M2)``.
    """
    total = float(counts.sum())
    n = xp.asarray(counts.reshape(-1, 1))
    means = table[:, :c]
    m2s = table[:, c : 2 * c]
    mean = (n * means).sum(axis=0) / total
    delta = means - mean
    m2 = m2s.sum(axis=0) + (n * delta * delta).sum(axis=0)
    return total, xp.ascontiguousarray(mean), xp.ascontiguousarray(m2)


def sync_batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                            training=True, momentum=0.1, eps=1e-5, channel_axis=1, comm=None, backend=None,
                            *, num_features=None, out=None):
    """Batch normalization with statistics over every rank's batch.

    Collective when ``training``: every rank of ``comm`` must call it, with
    its own slice of the batch (any size, including 0) and the same
    parameters. Each rank gets what :func:`cnorm.batch_norm_forward` gives
    its rows of the concatenated batch (to rounding), and the running statistics are
    updated identically (bit for bit) on every rank, with the unbiased
    variance over the global count. In eval mode there is no communication.

    Parameters
    ----------
    x, weight, bias, running_mean, running_var, training, momentum, eps, channel_axis, backend
        As in :func:`cnorm.batch_norm_forward`; ranks may differ in their
        batch size and in their spatial shape, not in their channel count.
    comm : mpi4py.MPI.Comm, cupy.cuda.nccl.NcclCommunicator or Exchange, optional
        The ranks that share statistics; default ``MPI.COMM_WORLD``.
    num_features : int, optional
        The channel count every rank uses, checked against x on this rank
        before the exchange; defaults to the length of the first of weight,
        bias, running_mean, running_var given. Every rank's channel count is
        compared in the handshake in any case.
    out : array, optional
        Where to write y (then returned as y), as in
        :func:`cnorm.batch_norm_forward`: x's shape and dtype, writable, in
        x's memory layout; it may be x itself (in place: the local statistics
        are complete before y is written; :func:`sync_batch_norm_backward`
        then refuses that memory as x), no other input. Checked with this
        rank's other arguments before the exchange: a bad ``out`` on one
        rank fails every rank, as any other argument error does.

    Returns
    -------
    y : array
        Same shape, dtype and memory layout as ``x`` (``out`` when given).
    saved : SyncSaved
        For :func:`sync_batch_norm_backward`.

    Raises
    ------
    ImportError
        mpi4py is missing (``pip install "cnorm-kernels[mpi]"``).
    TypeError, ValueError
        This rank's arguments failed their checks, or this rank disagrees with
        the majority of ranks (with two, with rank 0) on the channel count,
        ``eps`` or ``momentum``, or is out of step with them (see the module
        documentation). Every other rank raises a PeerError at the same time.
    PeerError
        Another rank's arguments failed their checks or disagree (that rank
        raises its own TypeError or ValueError); raised on every rank, never a
        hang, before any output or running statistic is written.

    Examples
    --------
    Run with ``mpiexec -n 2 python -m mpi4py script.py`` (``-m mpi4py`` aborts
    every rank when one ends with an uncaught exception, instead of leaving
    the others waiting):

    >>> import numpy as np
    >>> from mpi4py import MPI                                   # doctest: +SKIP
    >>> from cnorm.distributed import sync_batch_norm_forward, sync_batch_norm_backward
    >>> x = np.random.default_rng(MPI.COMM_WORLD.rank).standard_normal((4, 3, 8, 8))  # doctest: +SKIP
    >>> y, saved = sync_batch_norm_forward(x, comm=MPI.COMM_WORLD)                 # doctest: +SKIP
    >>> dx, dw, db = sync_batch_norm_backward(np.ones_like(y), x, saved)          # doctest: +SKIP
    """
    training = v.check_bool("training", training)
    if not training:
        y, saved = batch_norm_forward(x, weight, bias, running_mean, running_var, False, momentum, eps,
                                      channel_axis, backend, out=out)
        return y, _sync_saved(saved, saved.problem.n * saved.problem.s, None)
    y, saved, mean, var = _sync_forward(x, weight, bias, running_mean, running_var, momentum, eps, channel_axis,
                                        comm, backend, num_features, out)
    if running_mean is not None and saved.count > 1:
        n = saved.count
        xp = get_backend_instance(saved.backend).xp
        _update_running(xp, running_mean, running_var, mean, var * (n / (n - 1)), momentum)
    return y, saved



def _out_of_step(fn: str, ex, has: str, reference) -> str:
    """The message for a rank whose synchronized call differs from the others' (forward vs backward)."""
    return (f"{fn}: rank {ex.rank} of {ex.size} is out of step with the others: "
            f"{has} called {_OP_NAMES.get(reference)} at this point; every rank must make the same "
            f"synchronized calls (training forwards, backwards) in the same order")

def _sync_forward(x, weight, bias, running_mean, running_var, momentum, eps, channel_axis, comm, backend,
                  num_features, out=None):
    """The collective training forward: ``(y, saved, mean, var)``.

    ``mean`` and the biased ``var`` are the global float64 statistics, of the
    backend's array module and bit-identical on every rank (None when every
    rank's batch is empty). The running buffers are only validated here.
    y is written into ``out`` when given (checked with the local arguments).
    """
    ex = get_exchange(comm, device=is_cupy_array(x))
    local, error = None, None
    try:
        declared = _declared_channels(num_features, weight, bias, running_mean, running_var)
        local = _Local(x, weight, bias, running_mean, running_var, eps, momentum, channel_axis, backend, declared,
                       out)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks, or they hang
        error = exc
    mine = np.zeros(_SLOTS)
    mine[_OP], mine[_CALL] = _FORWARD, _next_forward(ex)
    if error is None:
        mine[_CHANNELS], mine[_COUNT], mine[_EPS], mine[_MOMENTUM] = local.c, local.count, local.eps, local.momentum
    else:
        mine[_STATUS], mine[_CHANNELS] = _FAILED, _channels_of(x, channel_axis)

    def mismatch(slot, reference, holders):
        has = f"{_ranks(holders)} of {ex.size} {'has' if len(holders) == 1 else 'have'}"
        if slot == _OP:
            return _out_of_step("sync_batch_norm_forward", ex, has, reference)
        if slot == _CALL:
            return (f"sync_batch_norm_forward: rank {ex.rank} of {ex.size} is out of step with the others: this "
                    f"is its synchronized forward call #{int(mine[_CALL])} over this communicator, but "
                    f"#{int(reference)} on {_ranks(holders)}; every rank must make the same synchronized calls "
                    f"in the same order")
        if slot == _CHANNELS:
            return (f"x: expected {int(reference)} channels on every rank ({has} {int(reference)}), got "
                    f"{int(mine[_CHANNELS])} on rank {ex.rank} (shape {tuple(x.shape)}, channel_axis="
                    f"{channel_axis})")
        name = "eps" if slot == _EPS else "momentum"
        return f"{name}: expected the same value on every rank ({has} {reference!r}), got {float(mine[slot])!r}"

    head = _handshake(ex, mine, error, (_EPS, _MOMENTUM), mismatch)
    _count_forward(ex, int(mine[_CALL]))
    c = local.c

    be, p, view, xp = local.be, local.p, local.view, local.be.xp
    sd = stats_dtype(x.dtype)
    counts = head[:, _COUNT]
    if counts.sum() == 1:
        raise ValueError(f"x: expected more than 1 value per channel over all ranks when training, got 1 "
                         f"(values per channel on each rank: {counts.astype(int).tolist()})")
    overwritten = local.overwritten
    if counts.sum() == 0:
        nan = xp.full(c, xp.nan, dtype=sd)
        saved = SyncSaved(p, view, nan, nan, True, bias is not None, be.name, (c,), x.dtype, 0, ex,
                          int(mine[_CALL]))
        saved.overwritten = overwritten
        return (xp.empty_like(x) if out is None else out), saved, None, None

    # Every rank agreed on c: the data Allgather has the same size everywhere.
    table = ex.allgather(ex.xp.concatenate([_to_module(ex.xp, local.mean), _to_module(ex.xp, local.m2)]))
    total, mean, m2 = _merge(ex.xp, table, counts, c)
    mean, var = _to_module(xp, mean), _to_module(xp, m2) / total
    w, b = _affine(be, weight, bias, c, sd)
    mean_sd, rstd, scale, shift = be.fold_frozen(mean, var, w, b, local.eps, sd)
    if not local.count:
        y = xp.empty_like(x) if out is None else out
    elif out is None:
        y = view.from3(be.forward_eval(local.x3, p, scale, shift))
    else:  # (x3's statistics were taken before the exchange: y may replace x)
        be.forward_eval(local.x3, p, scale, shift, view.to3(out, xp))
        y = out
    saved = SyncSaved(p, view, mean_sd, rstd, True, bias is not None, be.name, (c,), x.dtype, int(total), ex,
                      int(mine[_CALL]))
    saved.overwritten = overwritten
    return y, saved, mean, var


def sync_batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, training=True,
                    momentum=0.1, eps=1e-5, channel_axis=1, comm=None, backend=None, *, num_features=None,
                    out=None):
    """:func:`sync_batch_norm_forward` without the saved state (collective when training)."""
    return sync_batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                   channel_axis, comm, backend, num_features=num_features, out=out)[0]


def sync_batch_norm_backward(dy, x, saved, weight=None, comm=None, *, out=None):
    """Gradients of :func:`sync_batch_norm_forward`.

    Collective after a training forward (a handshake, then one Allreduce):
    every rank that ran the forward must call it, for the same forwards in
    the same order. After an eval forward it is local.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to this rank's y.
    x : array
        This rank's forward input.
    saved : SyncSaved
        The second result of :func:`sync_batch_norm_forward`.
    weight : array of shape (C,), optional
        The forward weight; without it dweight is None.
    comm : optional
        Default: the forward's transport. Pass one only to override it.
    out : array, optional
        Where to write dx (then returned as dx), as in
        :func:`cnorm.batch_norm_backward`; it may be dy or x itself (in
        place: the local sums are complete before dx is written). Checked
        with this rank's other arguments before the exchange, so a bad
        ``out`` on one rank fails every rank.

    Returns
    -------
    dx : array
        The gradient of the summed loss of all ranks with respect to this
        rank's x (it depends on every rank's dy through the statistics);
        ``out`` when given.
    dweight, dbias : array of shape (C,) or None
        This rank's contributions ``Σ dy·xhat`` and ``Σ dy`` over its own
        rows, as PyTorch's SyncBatchNorm returns them: their sum over ranks is
        the gradient of the whole batch, which the usual all-reduce of
        parameter gradients forms.

    Raises
    ------
    TypeError, ValueError
        This rank's arguments failed their checks, or it differentiates
        another forward than the majority of ranks (with two, than rank 0),
        or is out of step with them. Every other rank raises a PeerError at
        the same time.
    PeerError
        Another rank's arguments failed their checks or disagree; raised on
        every rank, before any gradient is returned.
    """
    if not isinstance(saved, SyncSaved):
        raise TypeError(f"saved: expected the SyncSaved object returned by sync_batch_norm_forward, "
                        f"got {v.type_name(saved)}")
    if not saved.batch_stats:
        return _backward("sync_batch_norm", dy, x, saved, weight, out)
    p, c = saved.problem, saved.problem.c
    sd = stats_dtype(saved.dtype)
    ex = saved.exchange if comm is None else get_exchange(comm, device=is_cupy_array(x))

    error = None
    try:
        be, dy, x, _ = _check_backward("sync_batch_norm", dy, x, saved, weight, out)
        xp = be.xp
        x3 = dy3 = None
        if saved.count and p.n * p.s:
            x3, dy3 = saved.view.to3(x, xp), saved.view.to3(dy, xp)
            sum_dy, sum_dy_xhat = be.channel_grad_sums(dy3, x3, p, saved.mean, saved.rstd)
        else:
            sum_dy, sum_dy_xhat = xp.zeros(c, dtype=sd), xp.zeros(c, dtype=sd)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks, or they hang
        error = exc
    mine = np.zeros(_SLOTS)
    mine[_OP], mine[_CALL], mine[_CHANNELS], mine[_COUNT] = _BACKWARD, saved.call, c, saved.count
    mine[_STATUS] = _FAILED if error is not None else 0.0

    def mismatch(slot, reference, holders):
        has = f"{_ranks(holders)} of {ex.size} {'has' if len(holders) == 1 else 'have'}"
        same = "every rank must differentiate the same synchronized forward calls in the same order"
        if slot == _OP:
            return _out_of_step("sync_batch_norm_backward", ex, has, reference)
        if slot == _CALL:
            return (f"saved: rank {ex.rank} of {ex.size} differentiates its synchronized forward call "
                    f"#{int(mine[_CALL])} over this communicator, but {_ranks(holders)} their call "
                    f"#{int(reference)}; {same}")
        if slot == _CHANNELS:
            return (f"saved: expected the state of a forward with {int(reference)} channels on every rank "
                    f"({has} {int(reference)}), got one with {c} on rank {ex.rank}; {same}")
        return (f"saved: expected the state of a forward over {int(reference)} values per channel on every rank "
                f"({has} {int(reference)}), got one over {saved.count} on rank {ex.rank}; {same}")

    _handshake(ex, mine, error, (_COUNT,), mismatch)
    if saved.count == 0:  # no values anywhere: zero gradients, nothing to sum
        zeros = xp.zeros(c, dtype=sd)
        return _zeros_into(xp, x, out), None if weight is None else zeros, zeros.copy() if saved.has_bias else None
    # Every rank agreed on c: the Allreduce has the same size everywhere.
    totals = ex.allreduce_sum(ex.xp.concatenate([_to_module(ex.xp, sum_dy), _to_module(ex.xp, sum_dy_xhat)]))
    mean_dy = _to_module(xp, totals[:c]) / saved.count
    mean_dy_xhat = _to_module(xp, totals[c:]) / saved.count
    if x3 is not None:
        # (the local sums over dy3 and x3 were taken before the exchange: dx may replace either)
        w, _ = _affine(be, weight, None, c, sd)
        out3 = None if out is None else saved.view.to3(out, xp)
        dx3 = be.channel_backward_apply(dy3, x3, p, saved.mean, saved.rstd, w,
                                        mean_dy.astype(sd), mean_dy_xhat.astype(sd), out3)
        dx = saved.view.from3(dx3) if out is None else out
    else:
        dx = _zeros_into(xp, x, out)
    dweight = None if weight is None else sum_dy_xhat.astype(sd, copy=False).reshape(c)
    dbias = sum_dy.astype(sd, copy=False).reshape(c) if saved.has_bias else None
    return dx, dweight, dbias


def _fail_backward(saved: SyncSaved, error):
    """This rank's synchronized backward of ``saved`` fails with ``error`` before its checks: run the
    backward's handshake with a failed status, so this rank raises ``error`` and every other rank a
    PeerError (as for a failed argument check in :func:`sync_batch_norm_backward`)."""
    mine = np.zeros(_SLOTS)
    mine[_STATUS], mine[_OP], mine[_CALL] = _FAILED, _BACKWARD, saved.call
    mine[_CHANNELS], mine[_COUNT] = saved.problem.c, saved.count
    _handshake(saved.exchange, mine, error, (_COUNT,), None)


def _zeros_into(xp, x, out):
    """A zero gradient shaped like x: new, or written into ``out``."""
    if out is None:
        return xp.zeros_like(x)
    out[...] = 0
    return out


# -- the layer ---------------------------------------------------------------------

class SyncBatchNorm(_BatchNorm):
    """Batch normalization whose training statistics span every rank's batch, like ``torch.nn.SyncBatchNorm``.

    A :class:`cnorm.nn.BatchNorm2d` (and 1d, 3d: any input of rank >= 2)
    that, in training mode, normalizes with the statistics of the batch
    concatenated over every rank of ``comm`` (:func:`sync_batch_norm_forward`).
    Every rank must run the same layers in the same order with the same
    parameters and buffers (broadcast them at start-up); batch sizes may
    differ, including 0. Running statistics and ``num_batches_tracked`` then
    stay bit-identical on every rank. Eval mode and frozen layers do not
    communicate.

    Inside :func:`cnorm.nn.precise_bn` every batch's statistics are those of
    all ranks, so the precise statistics cover every rank's batches; each
    rank must run the same number of forward calls in the block (a rank with
    fewer batches passes empty ones).

    ``backward`` differentiates through the global statistics (a handshake
    and one Allreduce); ``weight_grad`` and ``bias_grad`` are this rank's
    contributions, which the usual all-reduce of gradients sums, exactly as
    for every other parameter.

    ``layer(x, out=buf)`` and ``layer.backward(dy, out=buf)`` write into a
    caller's buffer, as every cnorm layer does; in training a bad ``out`` on
    one rank fails every rank, like any other argument error.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps, momentum, affine, track_running_stats, bias, channel_axis, dtype, backend
        As in :class:`cnorm.nn.BatchNorm2d`.
    comm : mpi4py.MPI.Comm, cupy.cuda.nccl.NcclCommunicator or Exchange, optional
        The ranks that share statistics; default ``mpi4py.MPI.COMM_WORLD``
        (resolved at the first training call; mpi4py is needed then:
        ``pip install "cnorm-kernels[mpi]"``).

    Raises
    ------
    ValueError
        From a training forward or backward on the rank(s) whose channel count
        (``num_features``) or call sequence differs from the majority's (with
        two ranks, from rank 0's); the others raise PeerError. Nothing is
        updated on any rank.
    PeerError
        From a training forward or backward, when another rank's input failed
        its checks or disagrees (that rank raises its own error): every rank
        raises.

    Examples
    --------
    Run with ``mpiexec -n 4 python -m mpi4py train.py``: with ``-m mpi4py``
    an uncaught exception on one rank aborts the whole job; with plain
    ``python train.py`` the other ranks would wait forever in their next
    collective.

    >>> import numpy as np, cnorm.nn
    >>> bn = cnorm.nn.SyncBatchNorm(16)
    >>> x = np.random.default_rng(0).standard_normal((8, 16, 4, 4)).astype(np.float32)
    >>> y = bn(x)                                       # doctest: +SKIP
    >>> dx = bn.backward(np.ones_like(y))               # doctest: +SKIP
    """

    _SHAPES = "(N, C, ...)"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 bias=True, channel_axis=1, dtype=np.float32, backend=None, comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias=bias,
                         channel_axis=channel_axis, dtype=dtype, backend=backend)
        self.comm = _check_comm(comm)

    def _communicates(self) -> bool:
        """Whether the next forward uses global batch statistics (mirrors _BatchNorm._forward's branches)."""
        return self._records is not None or (self.training and not self.frozen)

    def _check_input(self, x):
        if self._communicates():
            return  # checked inside the collective, so that a bad input on one rank fails every rank
        if x.ndim < 2:
            raise ValueError(f"x: SyncBatchNorm expects input of at least 2 dimensions {self._SHAPES}, "
                             f"got shape {tuple(x.shape)}")
        self._check_channels(x, self.channel_axis, self.num_features, "num_features")

    def _batch_stats_forward(self, x, out=None):
        if not self._communicates():  # eval mode without running statistics: local, as in PyTorch
            return super()._batch_stats_forward(x, out)
        y, saved, mean, var = _sync_forward(x, self.weight, self.bias, None, None, 0.0, self.eps,
                                            self.channel_axis, self.comm, self.backend, self.num_features, out)
        if mean is None:
            xp = get_backend_instance(saved.backend).xp
            mean = var = xp.zeros(self.num_features, dtype=np.float64)
        return y, saved, BatchStats(mean, var, saved.count)

    def _refuse_backward(self, ctx, error):
        saved = ctx[0]
        if isinstance(saved, SyncSaved) and saved.batch_stats:
            # The other ranks are entering the backward's handshake: fail it, so that they raise a
            # PeerError instead of waiting for this rank.
            _fail_backward(saved, error)
        raise error

    def _batch_stats_backward(self, dy, x, saved, out=None):
        if isinstance(saved, SyncSaved):
            return sync_batch_norm_backward(dy, x, saved, self.weight, out=out)
        return super()._batch_stats_backward(dy, x, saved, out)


def _check_comm(comm):
    """Type-check a communicator without starting MPI or running a collective."""
    if comm is None or isinstance(comm, Exchange):
        return comm
    if type(comm).__module__.split(".")[0] in ("mpi4py", "cupy", "cupy_backends"):
        return comm
    raise TypeError(f"comm: expected an mpi4py communicator, a cupy.cuda.nccl.NcclCommunicator or a "
                    f"cnorm.distributed.Exchange, got {v.type_name(comm)}")


def _to_sync(layer, comm):
    """A SyncBatchNorm sharing ``layer``'s parameters, buffers and settings."""
    sync = SyncBatchNorm.__new__(SyncBatchNorm)
    sync.__dict__.update(vars(layer))
    sync._pending = None
    sync.comm = comm
    return sync


def convert_sync_batchnorm(layers, comm=None):
    """Replace BatchNorm layers by SyncBatchNorm ones, like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

    Each :class:`cnorm.nn.BatchNorm1d`, ``2d`` or ``3d`` becomes a
    :class:`SyncBatchNorm` that shares its arrays (parameters, running
    statistics, ``num_batches_tracked``: references stay valid) and its
    settings (eps, momentum, channel_axis, train/eval, frozen). Other layers,
    :class:`cnorm.nn.FrozenBatchNorm2d` included, are returned unchanged.

    Parameters
    ----------
    layers : layer, sequence of layers, or mapping of name to layer
    comm : optional
        As in :class:`SyncBatchNorm`.

    Returns
    -------
    layer, list or dict
        Same structure as ``layers``.

    Examples
    --------
    >>> import cnorm.nn
    >>> model = [cnorm.nn.BatchNorm2d(8), cnorm.nn.GroupNorm(2, 8)]
    >>> synced = cnorm.nn.convert_sync_batchnorm(model)
    >>> [type(layer).__name__ for layer in synced]
    ['SyncBatchNorm', 'GroupNorm']
    >>> synced[0].weight is model[0].weight
    True
    """
    comm = _check_comm(comm)

    def convert(layer):
        if isinstance(layer, _BatchNorm) and not isinstance(layer, (SyncBatchNorm, FrozenBatchNorm2d)):
            if getattr(layer, "activation", None) is not None:
                raise ValueError(f"layers: {layer!r} fuses activation={layer.activation!r}, which SyncBatchNorm "
                                 "does not; build the BatchNorm without it and apply the activation after")
            return _to_sync(layer, comm)
        return layer

    if isinstance(layers, _Layer):
        return convert(layers)
    if isinstance(layers, Mapping):
        return {name: convert(layer) for name, layer in layers.items()}
    try:
        return [convert(layer) for layer in layers]
    except TypeError:
        raise TypeError(f"layers: expected a layer, a sequence of layers or a mapping of name to layer, "
                        f"got {v.type_name(layers)}") from None

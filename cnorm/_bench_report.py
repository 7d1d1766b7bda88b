"""``python -m cnorm bench``'s report: whether each case can be trusted, the
progress counter, the OpenMP wait policy, and the plot.

The trust checks are pure functions of numbers the benchmark measured, so
that they are tested with made-up numbers, never with timings:

* the copy bandwidth must be steady across a case's rounds (its floor is
  their median; a large spread means the machine was busy or changed its
  clock while the case ran);
* no result may beat the memory floor by more than noise (one that does
  means the floor's copy ran slow: measured while the machine was busy);
* the machine must not be oversubscribed: the load average, or the other
  runnable threads plus the benchmark's, above the cores, or more threads
  requested than the cores this process may run on.
"""

from __future__ import annotations

import os
import sys
import time

# -- trust checks --------------------------------------------------------------------

#: copy bandwidth spread across a case's rounds (max / min - 1) above which the floor is unsteady
COPY_SPREAD_LIMIT = 0.25
#: a median this much below the floor's time (floor / median above 1 / 0.9) is faster than memory allows
FLOOR_NOISE = 0.9

#: code -> (what is wrong, the likely cause and the remedy); the codes mark the table's rows
TRUST_NOTES = {
    "B": ("copy bandwidth unsteady across the case's rounds",
          "the machine was busy or its clock frequency changed (frequency scaling); close other programs, "
          "pin the threads (e.g. taskset), rerun"),
    "F": ("faster than the memory floor",
          "the floor was measured low: its copy ran while the machine was busy; rerun"),
    "L": ("machine oversubscribed",
          "other work is running, or more threads were asked for than there are cores; results are noisy: "
          "close other programs or lower --threads, rerun"),
}


def copy_spread(bandwidths) -> float | None:
    """max / min - 1 of the copy bandwidths (or speeds) of a case's rounds; None with fewer than 2."""
    bw = [b for b in bandwidths if b and b > 0]
    if len(bw) < 2:
        return None
    return max(bw) / min(bw) - 1


def check_copy(bandwidths, limit: float = COPY_SPREAD_LIMIT) -> dict | None:
    """A "B" warning when the copy bandwidth of a case's rounds spreads by more than ``limit``."""
    spread = copy_spread(bandwidths)
    if spread is None or spread <= limit:
        return None
    return _warning("B", f"copy bandwidth {min(bandwidths) / 1e9:.1f} to {max(bandwidths) / 1e9:.1f} GB/s "
                         f"across the rounds (spread {spread:.0%}, limit {limit:.0%})")


def check_floor(fractions: dict, noise: float = FLOOR_NOISE) -> dict | None:
    """An "F" warning for the results (``{label: floor time / median}``) faster than the floor
    by more than noise: a median under ``noise`` of the floor's time."""
    fast = {k: f for k, f in fractions.items() if f is not None and f * noise > 1}
    if not fast:
        return None
    worst = max(fast, key=fast.get)
    return _warning("F", f"{', '.join(sorted(fast))} at up to {fast[worst]:.0%} of the floor ({worst}); "
                         f"a median under {noise:.0%} of the floor's time is faster than memory allows")


def check_load(load1: float | None, runnable_others: float | None, threads: int, cores: int,
               cores_available: int) -> dict | None:
    """An "L" warning when the machine is oversubscribed: the 1-minute load average above
    the ``cores``, the other runnable threads plus the benchmark's ``threads`` above the
    ``cores_available`` to this process, or ``threads`` above them."""
    why = []
    if threads > cores_available:
        why.append(f"{threads} threads asked for, {cores_available} cores available to this process")
    if runnable_others is not None and runnable_others + threads > cores_available:
        why.append(f"{runnable_others:g} other runnable threads besides the benchmark's {threads} "
                   f"on {cores_available} cores")
    if load1 is not None and load1 > cores:
        why.append(f"load average {load1:.2f} above {cores} cores")
    return _warning("L", "; ".join(why)) if why else None


def _warning(code: str, detail: str) -> dict:
    what, remedy = TRUST_NOTES[code]
    return {"code": code, "what": what, "detail": detail, "remedy": remedy}


def trust(row: dict, threads: int, cores: int, cores_available: int) -> dict:
    """The trust checks of one case's row (as :func:`cnorm._bench.run_case` returns it, with
    ``copy_bandwidths_Bps``, ``load_average`` and ``runnable_others``): ``{"ok", "codes",
    "warnings"}``."""
    fractions = {}
    for b, r in row.get("results", {}).items():
        fractions[b] = r.get("floor_fraction")
        if "out" in r and r["out"].get("out_variant", True):
            fractions[f"{b} out"] = r["out"].get("floor_fraction")
    found = [w for w in (check_copy(row.get("copy_bandwidths_Bps") or []),
                         check_floor(fractions),
                         check_load(row.get("load_average"), row.get("runnable_others"), threads, cores,
                                    cores_available)) if w]
    return {"ok": not found, "codes": "".join(w["code"] for w in found), "warnings": found}


def trust_notes(rows) -> list[str]:
    """The footnotes of the codes that mark some row, with cause and remedy, and a count."""
    codes = {c for row in rows for c in (row.get("trust") or {}).get("codes", "")}
    if not codes:
        return ["check: every case passed the trust checks (steady copy bandwidth, nothing faster than the "
                "memory floor, machine not oversubscribed)."]
    flagged = sum(1 for row in rows if (row.get("trust") or {}).get("codes"))
    lines = [f"check: {flagged} of {len(rows)} cases failed a trust check; their numbers may not hold:"]
    lines += [f"  {c}: {TRUST_NOTES[c][0]} - {TRUST_NOTES[c][1]}." for c in sorted(codes)]
    return lines


# -- machine load ----------------------------------------------------------------------

def cores_available() -> int:
    """Cores this process may run on (its CPU affinity), else every core."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def procs_running() -> int | None:
    """Threads running or runnable on the whole machine now (Linux's /proc/stat), this one included."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def own_running() -> int:
    """This process's threads running or runnable now (state R in /proc/self/task), at least 1."""
    n = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    # the state follows the command name's closing parenthesis
                    n += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                continue
    except OSError:
        return 1
    return max(1, n)


def runnable_others() -> int | None:
    """Threads of other processes running or runnable now, or None where unknown."""
    total = procs_running()
    return None if total is None else max(0, total - own_running())


# -- OpenMP wait policy -------------------------------------------------------------------

WAIT_POLICY = "OMP_WAIT_POLICY"
#: set (with the value) in the environment of a benchmark process that set the policy itself
WAIT_POLICY_SET = "CNORM_BENCH_SET_WAIT_POLICY"


def wait_policy_plan(environ, started: bool, reexec_ok: bool) -> str:
    """What ``python -m cnorm bench`` does about OpenMP's wait policy.

    ``"user"``: the user set OMP_WAIT_POLICY: keep it. ``"set"``: the benchmark
    set PASSIVE before the OpenMP runtimes started (this process was re-executed
    with it, or no runtime had started). ``"reexec"``: a runtime has started
    without it and this process may re-execute itself with it. ``"late"``: it
    cannot (the benchmark is called inside another program): the runtimes keep
    their default policy, whose idle threads spin on the cores for a while."""
    if environ.get(WAIT_POLICY_SET):
        return "set"
    if environ.get(WAIT_POLICY):
        return "user"
    if not started:
        return "set"
    return "reexec" if reexec_ok else "late"


def openmp_started() -> bool:
    """Whether an OpenMP runtime (libgomp, Intel's or LLVM's) is loaded in this process;
    True where that cannot be told (cnorm's extension loads one at import)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return True
    return any(name in maps for name in ("libgomp", "libiomp", "libomp"))


def passive_env() -> dict:
    """The environment that makes a process's OpenMP runtimes' idle threads sleep, and says who set it."""
    return {WAIT_POLICY: "PASSIVE", WAIT_POLICY_SET: "PASSIVE"}


def wait_policy_record(plan: str, environ) -> dict:
    """bench.json's and the header's record of the policy in force."""
    value = environ.get(WAIT_POLICY)
    if plan == "set":
        return {"value": value, "source": "set by the benchmark before the OpenMP runtimes started"}
    if plan == "user":
        return {"value": value, "source": "set by the user (OMP_WAIT_POLICY)"}
    return {"value": None, "source": "the runtimes' default in this process (they started before the benchmark "
                                     "could set OMP_WAIT_POLICY=PASSIVE: idle threads spin for a while after each "
                                     "call); cases run in fresh processes get PASSIVE"}


# -- progress counter -----------------------------------------------------------------------

def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def estimate_left(done: int, total: int, elapsed: float, per_case_s: float) -> float:
    """Seconds left: the cases left times the mean time of the cases done so far,
    before any is done the per-case estimate ``per_case_s`` (the timing budget plus
    the set-up of a case)."""
    per = elapsed / done if done else per_case_s
    return max(0, total - done) * per


class Progress:
    """Cases done / total, elapsed and estimated time left, on ``stream`` (stderr):
    rewritten in place on a terminal, one line per case otherwise."""

    def __init__(self, total: int, per_case_s: float, stream=None, enabled: bool = True,
                 clock=time.monotonic, tty: bool | None = None):
        self.total, self.per_case_s, self.done = total, per_case_s, 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and total > 0
        self.clock = clock
        self.start = clock()
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self._shown = False

    def line(self, current: str = "") -> str:
        elapsed = self.clock() - self.start
        left = estimate_left(self.done, self.total, elapsed, self.per_case_s)
        width = len(str(self.total))
        text = (f"bench: {self.done:{width}d}/{self.total} cases done, {_clock(elapsed)} elapsed, "
                f"about {_clock(left)} left")
        return text + (f" (now: {current})" if current else "")

    def start_case(self, name: str) -> None:
        """Show the case now running (terminal only: a log gets one line per case done)."""
        if self.enabled and self.tty:
            self._write(self.line(name))

    def case_done(self, name: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.tty:
            self._write(self.line())
        else:
            print(self.line() + (f": {name}" if name else ""), file=self.stream, flush=True)

    def clear(self) -> None:
        """Wipe the in-place line (before other output, and at the end)."""
        if self.enabled and self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def _write(self, text: str) -> None:
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._shown = True

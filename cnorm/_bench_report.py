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

import numpy as np

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


# -- the plot ----------------------------------------------------------------------------------

#: the plot's sections, in order: (title, test on a row)
SECTIONS = [
    ("BatchNorm", lambda r: r["norm"] == "batch_norm" and not _fuse(r)),
    ("LayerNorm", lambda r: r["norm"] == "layer_norm" and not _fuse(r)),
    ("InstanceNorm", lambda r: r["norm"] == "instance_norm" and not _fuse(r)),
    ("GroupNorm", lambda r: r["norm"] == "group_norm" and not _fuse(r)),
    ("RMSNorm", lambda r: r["norm"] == "rms_norm" and not _fuse(r)),
    ("Fused: residual add + norm, norm + activation", lambda r: bool(_fuse(r))),
]
_DTYPES = {"float32": "", "bfloat16": "bf16", "float16": "f16"}
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.3}  # values stay legible on lines
_ABBR = {"batch_norm": "BN", "group_norm": "GN", "layer_norm": "LN", "rms_norm": "RMS", "instance_norm": "IN"}


def _fuse(row) -> str:
    """The fused part of a row's case name ("add", "relu", "silu") or ''."""
    name = row["case"]
    if name.startswith("add+"):
        return "add"
    head = name.split("-", 1)[0]
    return head.split("+", 1)[1] if "+" in head else ""


def short_label(row) -> str:
    """A row's label within its section: direction, shape, layout, and what sets it apart
    (eval mode, groups, the fused op, a half dtype, per-call latency)."""
    parts = row["case"].split("-")
    head, rest = parts[0], parts[1:]
    fused = ""
    if "+" in head:
        a, b = head.split("+", 1)
        fused = f"add+{_ABBR.get(b, b)}" if a == "add" else f"{_ABBR.get(a, a)}+{b}"
    extra = [p for p in rest if p == "eval" or (p.startswith("G") and p[1:].isdigit())]
    direction = next((p for p in rest if p in ("fwd", "bwd")), "")
    shape = next((p for p in rest if "x" in p and p.replace("x", "").isdigit()), "")
    layout = next((p for p in rest if p in ("cf", "cl")), "")
    dtype = _DTYPES.get(row.get("dtype", "float32"), row.get("dtype", ""))
    bits = [fused, direction, shape.replace("x", "×"), "NHWC" if layout == "cl" else "", *extra, dtype,
            "latency" if row.get("latency") else ""]
    return " ".join(b for b in bits if b)


def plot_layout(rows):
    """``[(section title, [row, ...]), ...]``: the rows grouped by norm, sections in
    :data:`SECTIONS` order, empty ones left out, rows in run order."""
    out = []
    for title, test in SECTIONS:
        members = [r for r in rows if test(r)]
        if members:
            out.append((title, members))
    return out


def plot_title(meta: dict) -> str:
    """Machine, threads, CPU levels, versions and date of a run."""
    lv = meta.get("levels") or {}
    v = meta.get("versions") or {}
    level = f"cnorm {lv.get('cnorm') or '-'}" + (f", PyTorch {lv['torch']}" if lv.get("torch") else "")
    versions = ", ".join(f"{k} {v[k]}" for k in ("cnorm", "torch", "numpy") if v.get(k))
    return (f"python -m cnorm bench: cnorm against PyTorch and the memory floor\n"
            f"{meta.get('cpu', '?')}, {meta.get('threads', '?')} threads, CPU level {level}\n"
            f"{versions}; {meta.get('date', '')}")


def plot(rows, backends, path: str, meta: dict | None = None, cnorm_backend: str = "cython") -> None:
    """One figure: a row per case, in sections per norm. Left: PyTorch's median time /
    cnorm's (log axis; PyTorch = 1 is the reference line), plain against plain and out
    against out. Right: the % of the memory floor cnorm's and PyTorch's out calls reach
    (floor time / median; 100% = the floor). Values on the bars; untrusted rows (the
    trust checks) in red with their codes; machine, threads, levels, versions and date
    in the title."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    meta = meta or {}
    cn = cnorm_backend if cnorm_backend in backends else next((b for b in backends if b != "torch"), None)
    torch_on = "torch" in backends
    layout = plot_layout(rows)
    # y positions, top to bottom: a header line per section, then its rows
    ys, labels, heads, y = [], [], [], 0.0
    order = []
    for title, members in layout:
        heads.append((y, title))
        y += 1.0
        for r in members:
            order.append(r)
            codes = (r.get("trust") or {}).get("codes", "")
            labels.append(short_label(r) + (f"  [{codes}]" if codes else ""))
            ys.append(y)
            y += 1.0
        y += 0.4
    n = max(y, 4)
    fig = Figure(figsize=(13, 2.6 + 0.25 * n), layout="constrained")
    ax_r, ax_f = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1.25, 1]})
    ys_a = np.asarray(ys)
    h = 0.38

    def res(r, b, variant):
        x = (r.get("results") or {}).get(b) or {}
        return x if variant == "plain" else (x.get("out") or {})

    # left: PyTorch's time / cnorm's
    ratio_bars = [("plain", "cnorm plain vs PyTorch plain", "#1f77b4", None, -h / 2),
                  ("out", "cnorm out vs PyTorch out", "#8fbbd9", "//", h / 2)]
    if cn and torch_on:
        for variant, label, color, hatch, dy in ratio_bars:
            vals = [res(r, cn, variant).get("speedup_vs_torch") for r in order]
            pos = [(yy + dy, v) for yy, v in zip(ys_a, vals) if v]
            if not pos:
                continue
            py, pv = zip(*pos)
            # from PyTorch's 1 to the ratio: right of the line cnorm is faster, left of it slower
            ax_r.barh(py, [v - 1 for v in pv], height=h, left=1, color=color, hatch=hatch, edgecolor="#33557a",
                      linewidth=0.4, label=label)
            for yy, v in pos:
                ax_r.text(v * 1.03 if v >= 1 else v / 1.03, yy, f"{v:.2f}×", va="center",
                          ha="left" if v >= 1 else "right", fontsize=7, bbox=_LABEL_BOX)
        ax_r.set_xscale("log")
        lo = min([v for r in order for v in (res(r, cn, "plain").get("speedup_vs_torch"),
                                             res(r, cn, "out").get("speedup_vs_torch")) if v] or [1])
        hi = max([v for r in order for v in (res(r, cn, "plain").get("speedup_vs_torch"),
                                             res(r, cn, "out").get("speedup_vs_torch")) if v] or [1])
        ax_r.set_xlim(min(lo, 1) / 1.8, max(hi, 1) * 1.8)
        ax_r.axvline(1.0, color="k", lw=1.2, label="PyTorch (= 1)")
        ax_r.set_xlabel("PyTorch time / cnorm time (log scale; above 1: cnorm faster)")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

        wide = max(hi, 1) / min(lo, 1) > 60  # over about two decades: label the powers of ten only
        ax_r.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
        ax_r.xaxis.set_minor_locator(NullLocator())
        ax_r.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    else:
        ax_r.text(0.5, 0.5, "no PyTorch rows (not installed or not in --backends)", transform=ax_r.transAxes,
                  ha="center", va="center")
    ax_r.set_title("speed against PyTorch (same threads, same CPU level)", fontsize=10, pad=34)

    # right: % of the memory floor, out calls (a backend without them: its plain call)
    floor_bars = [(b, c, dy) for b, c, dy in ((cn, "#1f77b4", -h / 2),
                                              ("torch" if torch_on else None, "#ff7f0e", h / 2)) if b]
    top = 1.0
    for b, color, dy in floor_bars:
        vals = [(res(r, b, "out") or res(r, b, "plain")).get("floor_fraction") for r in order]
        pos = [(yy + dy, v * 100) for yy, v in zip(ys_a, vals) if v]
        if not pos:
            continue
        py, pv = zip(*pos)
        top = max(top, max(pv) / 100)
        label = ("cnorm" if b == cn else "PyTorch") + " out calls"
        ax_f.barh(py, pv, height=h, left=0, color=color, edgecolor="#444444", linewidth=0.4, label=label)
        for yy, v in pos:
            ax_f.text(v + 1.5, yy, f"{v:.0f}%", va="center", ha="left", fontsize=7, bbox=_LABEL_BOX)
    ax_f.axvline(100, color="k", lw=1.2, ls="--", label="memory floor (= 100%)")
    for yy, r in zip(ys_a, order):
        if r.get("floor_s") is None:
            ax_f.text(2, yy, "no floor (per-call latency case)", va="center", ha="left", fontsize=7, color="#666666")
    ax_f.set_xlim(0, max(120, top * 100 * 1.15))
    ax_f.set_xlabel("floor time (bytes moved / copy bandwidth) / median, %")
    ax_f.set_title("% of the memory floor (out calls)", fontsize=10, pad=34)

    for ax in (ax_r, ax_f):
        ax.set_ylim(n - 0.3, -0.8)
        ax.grid(True, axis="x", which="major", alpha=0.3)
        for hy, _ in heads:
            ax.axhline(hy + 0.5, color="#999999", lw=0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize=8,
                      frameon=False)
    ax_r.set_yticks(list(ys) + [hy for hy, _ in heads])
    ax_r.set_yticklabels(labels + [t for _, t in heads], fontsize=8)
    for tick, text in zip(ax_r.get_yticklabels(), labels + [t for _, t in heads]):
        if text in {t for _, t in heads}:
            tick.set_fontweight("bold")
            tick.set_fontsize(9)
        elif text.endswith("]"):
            tick.set_color("#c00000")
    ax_r.tick_params(axis="y", length=0)
    if any((r.get("trust") or {}).get("codes") for r in order):
        notes = "; ".join(f"[{c}] {TRUST_NOTES[c][0]}" for c in sorted(
            {c for r in order for c in (r.get("trust") or {}).get("codes", "")}))
        fig.supxlabel(f"red rows failed a trust check ({notes}): their numbers may not hold - rerun on a quiet "
                      "machine", fontsize=8, color="#c00000")
    fig.suptitle(plot_title(meta), fontsize=10)
    fig.savefig(path, dpi=100)


def plot_report(report: dict, path: str) -> None:
    """:func:`plot` of a bench.json report (the date: its own, else today's)."""
    import datetime

    meta = {"cpu": report.get("machine", {}).get("cpu"), "threads": report.get("threads"),
            "levels": report.get("cpu_capability"),
            "versions": report.get("versions") or {"torch": report.get("torch"),
                                                   "numpy": report.get("machine", {}).get("numpy")},
            "date": report.get("date") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    plot(report["cases"], report["backends"], path, meta)

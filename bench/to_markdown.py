"""Render ``python -m cnorm bench``'s JSON as the Markdown tables the README shows.

    python bench/to_markdown.py bench_results/bench.json
    python bench/to_markdown.py --levels avx512.json avx2.json baseline.json [--ratio plain|out]
    python bench/to_markdown.py --fused avx512.json avx2.json   (bench --fused-only runs)

The per-case table gives cnorm's (the "cython" backend's) and PyTorch's median
time of the plain call (it allocates its output) and of the out variant (the
same call writing into a buffer reused across calls), cnorm's out speed-up
(plain / out), cnorm against PyTorch plain against plain and out against out,
and the fraction of the memory floor the out calls reach. A PyTorch out time
marked * is its plain call's (no out variant for that op), one marked † comes
from a generated out overload (it computes into new tensors, then copies into
out). With ``--levels``, one report per CPU level (``bench --cpu-capability``):
a summary line per level, with cnorm against PyTorch in the variant
``--ratio`` names (default: plain against plain), then each level's table in a
collapsible block.
"""

import argparse
import json
import statistics

CNORM = "cython"


def allocator(report: dict) -> str:
    """The allocator policy of the run (bench.json before it said: the mallopt flag)."""
    a = report.get("allocator")
    if a:
        return a["description"]
    return ("freed memory kept (mallopt)" if report.get("freed_memory_kept")
            else "glibc default (fresh outputs are page-faulted)")


def header(report: dict) -> str:
    m = report["machine"]
    per_case = [c["copy_bandwidth_Bps"] / 1e9 for c in report["cases"] if c.get("copy_bandwidth_Bps")]
    bw = (f"copy bandwidth measured in each case's timing rounds {min(per_case):.1f}–{max(per_case):.1f} GB/s"
          if per_case else f"copy bandwidth measured in the run {report['copy_bandwidth_Bps'] / 1e9:.1f} GB/s")
    lv = report.get("cpu_capability") or {}
    level = (f"cnorm at CPU level {lv.get('cnorm')}, PyTorch at {str(lv.get('torch')).upper()}, "
             if lv else "")
    bufs = {"per-copy": "; out variants: one buffer per input copy",
            "one": "; out variants: one buffer for every call"}.get(report.get("out_buffers"), "")
    fresh = "; each case in a fresh process" if report.get("isolated") else ""
    wait = report.get("openmp_wait_policy")
    wait = f"; OpenMP wait policy: {wait['value'] or 'default'}" if wait else ""
    flagged = [c["case"] for c in report["cases"] if (c.get("trust") or {}).get("codes")]
    trust = (f" {len(flagged)} of {len(report['cases'])} cases failed the benchmark's trust checks "
             f"(bench.json: trust)." if flagged else "")
    return (f"{m['cpu']}, {m['cores']} cores, {report['threads']} threads, {level}torch {report['torch']}, {bw}; "
            f"allocator: {allocator(report)}{bufs}{fresh}{wait}.{trust}")


def split_name(case: dict):
    """(case name without the dtype suffix, dtype)."""
    name = case["case"]
    for half in ("bfloat16", "float16"):
        if name.endswith("-" + half):
            return name[: -len(half) - 1], half
    return name, "float32"


def variant(res: dict, which: str) -> dict:
    """A backend's numbers for ``which`` ("plain" or "out"); {} where it has none."""
    if not res:
        return {}
    return res if which == "plain" else (res.get("out") or {})


def torch_mark(res: dict) -> str:
    out = (res or {}).get("out") or {}
    if out.get("out_variant") is False:
        return "*"
    return "†" if out.get("out_kernel") is False else ""


NOTES = {
    "*": "\\* PyTorch has no out variant for this op: its out time is its plain call's "
         "(cnorm × torch out compares with that).",
    "†": "† PyTorch's out overload of this op is generated: it computes into new tensors, then copies them "
         "into out (no CPU kernel writes out directly).",
}


def table(report: dict) -> str:
    lines = [
        header(report),
        "",
        "| case | dtype | cnorm plain ms | cnorm out ms | out speed-up | torch plain ms | torch out ms "
        "| cnorm × torch plain | cnorm × torch out | cnorm % of floor (out) | torch % of floor (out) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    marks = set()
    for case in report["cases"]:
        r = case["results"]
        name, dtype = split_name(case)
        latency = case.get("latency")

        def t(b, which):  # milliseconds; the per-call latency case in microseconds
            v = variant(r.get(b), which)
            if not v.get("n"):
                return "–"
            return f"{v['median_s'] * 1e6:.3g} µs" if latency else f"{v['median_s'] * 1e3:.3g}"

        def floor(b):
            f = variant(r.get(b), "out").get("floor_fraction")
            return "–" if f is None or latency else f"{100 * f:.0f}%"

        def ratio(x):
            return "–" if x is None else f"{x:.2f}"

        cn = r.get(CNORM, {})
        mark = torch_mark(r.get("torch")) if variant(r.get("torch"), "out").get("n") else ""
        marks.add(mark)
        lines.append(f"| {name} | {dtype} | {t(CNORM, 'plain')} | {t(CNORM, 'out')} | {ratio(cn.get('out_speedup'))} "
                     f"| {t('torch', 'plain')} | {t('torch', 'out')}{mark.replace('*', chr(92) + '*')} "
                     f"| {ratio(cn.get('speedup_vs_torch'))} | {ratio(variant(cn, 'out').get('speedup_vs_torch'))} "
                     f"| {floor(CNORM)} | {floor('torch')} |")
    notes = [NOTES[m] for m in ("*", "†") if m in marks]
    return "\n".join(lines + ([""] + notes if notes else []))


def fused_table(reports: list) -> str:
    """The RMSNorm and fused rows of runs at several CPU levels side by side: per case and
    level cnorm's plain call, cnorm's unfused sequence (for RMSNorm: its LayerNorm on the
    shape) and PyTorch eager doing the same work, in ms, and the two ratios."""
    levels_ = [(r.get("cpu_capability") or {}).get("cnorm") for r in reports]
    head = "| case | dtype | " + " | ".join(
        f"{lv}: cnorm ms | unfused ms | torch ms | × unfused | × torch" for lv in levels_) + " |"
    lines = ["\n\n".join(header(r) for r in reports), "", head,
             "| --- | --- |" + " ---: | ---: | ---: | ---: | ---: |" * len(reports)]
    by_name = [{c["case"]: c for c in r["cases"] if "baseline" in c} for r in reports]
    for name in by_name[0]:
        base, dtype = split_name(by_name[0][name])
        cells = []
        for cases in by_name:
            c = cases.get(name)
            if c is None:
                cells.append("– | – | – | – | –")
                continue
            cn, th = c["results"].get(CNORM, {}), c["results"].get("torch", {})

            def ms(v):
                return f"{v['median_s'] * 1e3:.3g}" if v and v.get("n") else "–"

            def ratio(x):
                return "–" if x is None else f"{x:.2f}"

            cells.append(f"{ms(cn)} | {ms(c['baseline'])} | {ms(th)} | {ratio(cn.get('speedup_vs_unfused'))} "
                         f"| {ratio(cn.get('speedup_vs_torch'))}")
        lines.append(f"| {base} | {dtype} | " + " | ".join(cells) + " |")
    lines += ["", "Plain calls (outputs allocated). unfused: cnorm's plain norm with the NumPy add or activation "
              "around it; for an RMSNorm row, cnorm's LayerNorm on the same shape. torch: PyTorch eager doing the "
              "same work (`x + r` then the norm, the norm then `F.relu`/`F.silu`, `F.rms_norm`). × unfused and × "
              "torch: their median / cnorm's."]
    return "\n".join(lines)


RATIO_LABEL = {"plain": "plain vs plain", "out": "out vs out"}


def summary(report: dict, which: str = "plain") -> str:
    """One line: the level, cnorm against PyTorch (``which`` variant of both) over the rows,
    the median fraction of the floor cnorm's out calls reach."""
    def ratio(c):
        return variant(c["results"].get(CNORM), which).get("speedup_vs_torch")

    rated = [c for c in report["cases"] if ratio(c)]
    ratios = [ratio(c) for c in rated]
    floors = [variant(c["results"].get(CNORM), "out").get("floor_fraction") for c in report["cases"]]
    floors = [f for f in floors if f]
    name, dtype = split_name(min(rated, key=ratio))
    lv = report.get("cpu_capability") or {}
    floor = f"{100 * statistics.median(floors):.0f}%" if floors else "–"
    return (f"| {lv.get('cnorm')} | {str(lv.get('torch')).upper()} | {sum(r >= 1 for r in ratios)} of {len(ratios)} "
            f"| {min(ratios):.2f} ({name} {dtype}) | {statistics.median(ratios):.2f} | {max(ratios):.2f} "
            f"| {floor} |")


def levels(reports: list, which: str = "plain") -> str:
    label = RATIO_LABEL[which]
    lines = [f"cnorm × PyTorch: {label} (PyTorch's median / cnorm's); allocator: "
             f"{'; '.join(sorted({allocator(r) for r in reports}))}.",
             "",
             f"| cnorm level | PyTorch level | rows cnorm ≥ PyTorch ({label}) | slowest × PyTorch | median × "
             "| fastest × | cnorm median % of floor (out) |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    lines += [summary(r, which) for r in reports]
    for r in reports:
        lv = (r.get("cpu_capability") or {}).get("cnorm")
        lines += ["", f"<details><summary>CPU level {lv}: every case</summary>", "", table(r), "", "</details>"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=["bench_results/bench.json"], help="bench.json files")
    parser.add_argument("--levels", action="store_true", help="one report per CPU level: a summary, then each table")
    parser.add_argument("--fused", action="store_true",
                        help="the RMSNorm and fused rows of runs at several levels, side by side")
    parser.add_argument("--ratio", choices=("plain", "out"), default="plain",
                        help="--levels summary: cnorm against PyTorch plain vs plain or out vs out "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    reports = []
    for path in args.paths:
        with open(path) as f:
            reports.append(json.load(f))
    if args.fused:
        print(fused_table(reports))
    elif args.levels:
        print(levels(reports, args.ratio))
    else:
        print("\n\n".join(table(r) for r in reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

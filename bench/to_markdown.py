"""Render ``python -m cnorm bench``'s JSON as the Markdown tables the README shows.

    python bench/to_markdown.py bench_results/bench.json
    python bench/to_markdown.py --levels avx512.json avx2.json baseline.json

With ``--levels``, one report per CPU level (``bench --cpu-capability``): a
summary line per level, then each level's table in a collapsible block.
"""

import json
import statistics
import sys


def header(report: dict) -> str:
    m = report["machine"]
    per_case = [c["copy_bandwidth_Bps"] / 1e9 for c in report["cases"] if c.get("copy_bandwidth_Bps")]
    bw = (f"copy bandwidth measured in each case's timing rounds {min(per_case):.1f}–{max(per_case):.1f} GB/s"
          if per_case else f"copy bandwidth measured in the run {report['copy_bandwidth_Bps'] / 1e9:.1f} GB/s")
    lv = report.get("cpu_capability") or {}
    level = (f"cnorm at CPU level {lv.get('cnorm')}, PyTorch at {str(lv.get('torch')).upper()}, "
             if lv else "")
    return f"{m['cpu']}, {m['cores']} cores, {report['threads']} threads, {level}torch {report['torch']}, {bw}."


def split_name(case: dict):
    """(case name without the dtype suffix, dtype)."""
    name = case["case"]
    for half in ("bfloat16", "float16"):
        if name.endswith("-" + half):
            return name[: -len(half) - 1], half
    return name, "float32"


def table(report: dict) -> str:
    lines = [
        header(report),
        "",
        "| case | dtype | cython ms | torch ms | numpy ms | cython × torch | cython % of floor | torch % of floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in report["cases"]:
        r = case["results"]
        name, dtype = split_name(case)
        latency = case.get("latency")

        def t(b):  # milliseconds; the per-call latency case in microseconds
            if b not in r or not r[b].get("n"):
                return "–"
            return f"{r[b]['median_s'] * 1e6:.3g} µs" if latency else f"{r[b]['median_s'] * 1e3:.3g}"

        def floor(b):
            f = r.get(b, {}).get("floor_fraction")
            return "–" if f is None or latency else f"{100 * f:.0f}%"

        ratio = r.get("cython", {}).get("speedup_vs_torch")
        lines.append(f"| {name} | {dtype} | {t('cython')} | {t('torch')} | {t('numpy')} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}'} | {floor('cython')} | {floor('torch')} |")
    return "\n".join(lines)


def summary(report: dict) -> str:
    """One line: the level, cython against PyTorch over the rows, floor fractions."""
    ratios = [c["results"]["cython"]["speedup_vs_torch"] for c in report["cases"]
              if c["results"].get("cython", {}).get("speedup_vs_torch")]
    floors = [c["results"]["cython"]["floor_fraction"] for c in report["cases"]
              if c["results"].get("cython", {}).get("floor_fraction")]
    slowest = min(report["cases"], key=lambda c: c["results"].get("cython", {}).get("speedup_vs_torch") or 1e9)
    name, dtype = split_name(slowest)
    lv = report.get("cpu_capability") or {}
    return (f"| {lv.get('cnorm')} | {str(lv.get('torch')).upper()} | {sum(r >= 1 for r in ratios)} of {len(ratios)} "
            f"| {min(ratios):.2f} ({name} {dtype}) | {statistics.median(ratios):.2f} | {max(ratios):.2f} "
            f"| {100 * statistics.median(floors):.0f}% |")


def levels(reports: list) -> str:
    lines = ["| cnorm level | PyTorch level | rows cnorm ≥ PyTorch | slowest × PyTorch | median × | fastest × "
             "| cnorm median % of floor |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    lines += [summary(r) for r in reports]
    for r in reports:
        lv = (r.get("cpu_capability") or {}).get("cnorm")
        lines += ["", f"<details><summary>CPU level {lv}: every case</summary>", "", table(r), "", "</details>"]
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--levels":
        reports = []
        for path in args[1:]:
            with open(path) as f:
                reports.append(json.load(f))
        print(levels(reports))
    else:
        with open(args[0] if args else "bench_results/bench.json") as f:
            print(table(json.load(f)))

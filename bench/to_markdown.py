"""Render ``python -m cnorm bench``'s JSON as the Markdown table the README shows.

    python bench/to_markdown.py bench_results/bench.json
"""

import json
import sys


def table(report: dict) -> str:
    m = report["machine"]
    per_case = [c["copy_bandwidth_Bps"] / 1e9 for c in report["cases"] if c.get("copy_bandwidth_Bps")]
    bw = (f"copy bandwidth measured in each case's timing rounds {min(per_case):.1f}–{max(per_case):.1f} GB/s"
          if per_case else f"copy bandwidth measured in the run {report['copy_bandwidth_Bps'] / 1e9:.1f} GB/s")
    lv = report.get("cpu_capability") or {}
    level = (f"cnorm at CPU level {lv.get('cnorm')}, PyTorch at {str(lv.get('torch')).upper()}, "
             if lv else "")
    lines = [
        f"{m['cpu']}, {m['cores']} cores, {report['threads']} threads, {level}torch {report['torch']}, {bw}.",
        "",
        "| case | dtype | cython ms | torch ms | numpy ms | cython × torch | cython % of floor | torch % of floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in report["cases"]:
        r = case["results"]
        name, dtype = case["case"], "float32"
        for half in ("bfloat16", "float16"):
            if name.endswith("-" + half):
                name, dtype = name[: -len(half) - 1], half
        latency = case.get("latency")

        def t(b):  # milliseconds; the per-call latency case in microseconds
            if b not in r:
                return "–"
            return f"{r[b]['median_s'] * 1e6:.3g} µs" if latency else f"{r[b]['median_s'] * 1e3:.3g}"

        def floor(b):
            f = r.get(b, {}).get("floor_fraction")
            return "–" if f is None or latency else f"{100 * f:.0f}%"

        ratio = r.get("cython", {}).get("speedup_vs_torch")
        lines.append(f"| {name} | {dtype} | {t('cython')} | {t('torch')} | {t('numpy')} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}'} | {floor('cython')} | {floor('torch')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1] if len(sys.argv) > 1 else "bench_results/bench.json") as f:
        print(table(json.load(f)))

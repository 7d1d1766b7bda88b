"""What ``out=`` buys: plain against out calls, and out against freed memory kept.

    python bench/out_summary.py DEFAULT.json [KEPT.json]

DEFAULT.json is a ``python -m cnorm bench`` run under glibc's default
allocator policy (plain calls allocate their output as a NumPy user's loop
does); KEPT.json, optionally, a run of the same cases with
``--keep-freed-memory`` (the policy the benchmark used to hide the page
faults with). For cnorm (the "cython" backend) it prints, per case, the plain
call's page faults per call and time, the out call's time and the speed-up
plain/out; with KEPT.json also the plain time there and out (default run)
against it. A case's output is "fresh" when its plain call page-faults: that
is where out= matters. The summary lines give the range of out speed-ups over
the fresh cases and over the others, and how out compares with the kept-memory
plain calls.
"""

import argparse
import json
import statistics

CNORM = "cython"


def rows(report: dict) -> dict:
    return {c["case"]: c for c in report["cases"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("default", help="bench.json of a run under glibc's default policy")
    parser.add_argument("kept", nargs="?", help="bench.json of a --keep-freed-memory run of the same cases")
    args = parser.parse_args(argv)
    with open(args.default) as f:
        default = json.load(f)
    kept = None
    if args.kept:
        with open(args.kept) as f:
            kept = json.load(f)
    kept_rows = rows(kept) if kept else {}
    head = "| case | plain page faults per call | plain ms | out ms | out speed-up |"
    sep = "| --- | ---: | ---: | ---: | ---: |"
    if kept:
        head += " plain ms, freed memory kept | out × kept plain |"
        sep += " ---: | ---: |"
    print(head)
    print(sep)
    fresh, reused, vs_kept = [], [], []
    for case in default["cases"]:
        res = case["results"].get(CNORM)
        if not res or "out" not in res or not res.get("n"):
            continue
        unit, suffix = (1e6, " µs") if case.get("latency") else (1e3, "")
        plain, out = res["median_s"], res["out"]["median_s"]
        faults = res.get("minor_faults_per_call") or 0.0
        speedup = plain / out
        (fresh if faults >= 1 else reused).append((speedup, case["case"]))
        line = (f"| {case['case']}{suffix} | {faults:.0f} | {plain * unit:.3g} | {out * unit:.3g} | "
                f"{speedup:.2f} |")
        k = kept_rows.get(case["case"], {}).get("results", {}).get(CNORM)
        if kept:
            if k and k.get("n"):
                ratio = k["median_s"] / out
                vs_kept.append((ratio, case["case"]))
                line += f" {k['median_s'] * unit:.3g} | {ratio:.2f} |"
            else:
                line += " – | – |"
        print(line)
    print()

    def spread(pairs, what):
        if not pairs:
            return f"{what}: none"
        lo, hi = min(pairs), max(pairs)
        med = statistics.median(p[0] for p in pairs)
        return (f"{what} ({len(pairs)} cases): {lo[0]:.2f} ({lo[1]}) to {hi[0]:.2f} ({hi[1]}), "
                f"median {med:.2f}")

    print(spread(fresh, "out speed-up where the plain call page-faults its output"))
    print(spread(reused, "out speed-up where it does not"))
    if kept:
        print(spread(vs_kept, "kept-memory plain time / out time (above 1: out is faster)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

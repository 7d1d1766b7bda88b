"""A quick check of an installed cnorm at the CPU level it chose: run under an
emulated CPU (qemu-x86_64 -cpu Haswell / SandyBridge) by tests/test_cpu_levels.py
and tools/check_wheel.sh, so that an instruction that leaked into the wrong
level fails as it would on a user's machine.

    python tests/cpu_check.py EXPECTED_LEVEL
    python tests/cpu_check.py --all-levels     (each level this CPU runs, in turn)

Every kernel family runs (cross-sample and per-sample statistics, both
layouts, forward and backward, eval mode, float32 and the half types) and is
compared with the NumPy reference. Prints the level; exits 1 on a wrong level
or result.
"""

import sys

import numpy as np

import cnorm
from cnorm._dtypes import BFLOAT16


def calls(x, cl):
    """(name, forward output, dx) of every norm on x (channels-last if cl)."""
    axis = -1 if cl else 1
    c = x.shape[axis]
    w = np.linspace(0.5, 1.5, c, dtype=np.float32)
    b = np.linspace(-1.0, 1.0, c, dtype=np.float32)
    dy = np.cos(np.arange(x.size, dtype=np.float32)).reshape(x.shape).astype(x.dtype)
    out = []
    for name, fwd, bwd in (
        ("batch_norm", lambda: cnorm.batch_norm_forward(x, w, b, channel_axis=axis), cnorm.batch_norm_backward),
        ("group_norm", lambda: cnorm.group_norm_forward(x, 4, w, b, channel_axis=axis), cnorm.group_norm_backward),
        ("instance_norm", lambda: cnorm.instance_norm_forward(x, w, b, channel_axis=axis),
         cnorm.instance_norm_backward),
    ):
        y, saved = fwd()
        out.append((name, y, bwd(dy, x, saved, w)[0]))
    if not cl:
        wl = np.linspace(0.5, 1.5, x.shape[-1], dtype=np.float32)
        y, saved = cnorm.layer_norm_forward(x, x.shape[-1], wl, wl)
        out.append(("layer_norm", y, cnorm.layer_norm_backward(dy, x, saved, wl)[0]))
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    out.append(("batch_norm eval", cnorm.batch_norm(x, w, b, rm, rv, training=False, channel_axis=axis), None))
    return out


def check_results() -> list:
    """Every kernel family at the level in use against the NumPy reference: the failures."""
    bad = []
    rng = np.random.default_rng(0)
    for dt, tol in ((np.float32, 1e-4), (BFLOAT16, 2.0 ** -6), (np.float16, 2.0 ** -9)):
        for cl in (False, True):
            x = (rng.standard_normal((4, 64, 5, 7)) * 2 + 1).astype(dt)
            x = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if cl else x
            got = calls(x, cl)
            with cnorm.use_backend("numpy"):
                want = calls(x, cl)
            for (name, y, dx), (_, yr, dxr) in zip(got, want):
                for what, a, r in (("y", y, yr), ("dx", dx, dxr)):
                    if a is None:
                        continue
                    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
                    err = float(np.max(np.abs(a - r))) / max(1.0, float(np.max(np.abs(r))))
                    if not err <= tol:
                        bad.append(f"{name} {np.dtype(dt).name} {'cl' if cl else 'cf'} {what}: error {err:.2e}")
    return bad


def main(expected: str) -> int:
    if expected == "--all-levels":
        from cnorm import _cpu

        bad = []
        for lv in _cpu.usable_levels():
            with _cpu.use_level(lv):
                print("level", lv)
                bad += [f"{lv}: {b}" for b in check_results()]
    else:
        level = cnorm.get_cpu_capability()
        print("level", level)
        bad = ([] if level == expected else [f"level {level}, expected {expected}"]) + check_results()
    for line in bad:
        print("FAIL", line)
    print("ok" if not bad else f"{len(bad)} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

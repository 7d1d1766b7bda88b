"""Instructions per element of the neon level's hot loops (AArch64).

    python tools/aarch64_loops.py LOOPS.o [MODULE.so]

LOOPS.o: tools/aarch64_loops.cpp compiled for aarch64 with the kernel
modules' flags (tools/aarch64_test.sh does it). For each function there, the
innermost loops (a backward branch and the instructions it jumps back over)
are printed with their instruction mix; the body loop's element count per
iteration is read from its pointer increment. With MODULE.so (the compiled
_kernels_neon module), each loop body is also searched for there as the same
sequence of mnemonics, so the figures are those of the code that runs.
Uses aarch64-linux-gnu-objdump (override: OBJDUMP).
"""

import collections
import os
import re
import subprocess
import sys

OBJDUMP = os.environ.get("OBJDUMP", "aarch64-linux-gnu-objdump")
FUNC = re.compile(r"^[0-9a-f]+ <(.+)>:$")
BRANCH = re.compile(r"^(b\.\w+|b|cbz|cbnz|tbz|tbnz)$")


def disassemble(path):
    """{function: [(address, mnemonic, operands)]}"""
    out = subprocess.run([OBJDUMP, "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    funcs, cur = {}, None
    for ln in out.splitlines():
        m = FUNC.match(ln.strip())
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$", ln)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3).split("//")[0].strip()))
    return funcs


def loops(insns):
    """Innermost loops: (start, end) index ranges closed by a backward branch."""
    index = {a: i for i, (a, _, _) in enumerate(insns)}
    found = []
    for i, (a, mn, ops) in enumerate(insns):
        if BRANCH.match(mn):
            tgt = re.search(r"\b([0-9a-f]+) <", ops)
            if tgt and int(tgt.group(1), 16) <= a and int(tgt.group(1), 16) in index:
                found.append((index[int(tgt.group(1), 16)], i))
    return [(s, e) for s, e in found if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in found)]


def kind(mn, ops):
    """The instruction's class in the report."""
    vreg = re.search(r"\bv\d+\.|\b[qd]\d+\b", ops)
    if mn.startswith(("ld", "st")) and mn not in ("ldr", "str", "ldp", "stp", "ldur", "stur", "ld1", "st1",
                                                   "ld2", "st2", "ld1r"):
        return "other"
    if mn.startswith("ld") and vreg:
        return "vector load"
    if mn.startswith("st") and vreg:
        return "vector store"
    if mn in ("fmla", "fmls"):
        return "fmla"
    if mn in ("fadd", "fsub", "fmul", "fdiv") and vreg:
        return "fadd/fsub/fmul"
    if mn.startswith(("fcvt", "bfcvt")):
        return "fcvt"
    if mn == "mov" and vreg:
        return "register copy"
    if vreg:
        return "other vector"
    return "scalar"


def pointer_steps(body):
    """Immediates by which the loop advances a register: add xA, xA, #imm and post-index [xA], #imm."""
    steps = []
    for _, mn, ops in body:
        m = re.match(r"(x\d+), (x\d+), #(0x[0-9a-f]+|\d+)$", ops)
        if mn == "add" and m and m.group(1) == m.group(2):
            steps.append(int(m.group(3), 0))
        m = re.search(r"\], #(0x[0-9a-f]+|\d+)$", ops)
        if m:
            steps.append(int(m.group(1), 0))
    return steps


def elements(name, body):
    """Values per iteration: the widest pointer's step over its element size (float
    arrays, 4 bytes, where the function has any; else its data type's)."""
    steps = pointer_steps(body)
    if not steps:
        return None
    size = 4 if ("float const*" in name or "float*" in name or "<float>" in name) else 2
    return max(steps) // size


KERNELS = ("cn_ln_fwd_a", "cn_norm_run_a", "cn_dx_run", "cn_row_lanes")


def main():
    obj = sys.argv[1]
    module = disassemble(sys.argv[2]) if len(sys.argv) > 2 else None
    modtext = " " + " ".join(mn for f in (module or {}).values() for _, mn, _ in f) + " "
    for name, insns in sorted(disassemble(obj).items()):
        if not any(k in name for k in KERNELS):
            continue
        short = re.sub(r"^void \(anonymous namespace\)::", "", name).split("(")[0]
        for s, e in loops(insns):
            body = insns[s:e + 1]
            per = elements(name, body)
            if not per or per < 32:   # head/tail loops (fewer values), copies
                continue
            mix = collections.Counter(kind(mn, ops) for _, mn, ops in body)
            seq = " " + " ".join(mn for _, mn, _ in body) + " "
            where = "" if module is None else ("; same instructions in the module: yes" if seq in modtext
                                               else "; same instructions in the module: NOT FOUND")
            print(f"{short}: {len(body)} instructions per {per} values = {len(body) / per:.2f}/value{where}")
            print("    " + ", ".join(f"{k} {v}" for k, v in sorted(mix.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()

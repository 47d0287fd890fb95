"""Static SASS facts of the cuda backend's kernels (no GPU needed).

    python csrc/sass_report.py [--src DIR] [--json OUT]

Compiles forward.cu / backward.cu from DIR (default: this directory) for sm_90 with nvcc and
the torch extension flags, disassembles them with cuobjdump (it ships in the triton wheel) and
reports per kernel: registers, spills, static instruction count, tensor-core / ldmatrix /
cp.async / FFMA / global-load counts, and every loop (a backward branch) with its static size
and its HMMA / LDSM / LDGSTS counts.  Loop trip counts depend on the shapes, so per-step
instruction counts are derived from this by hand (docs/cuda.md shows the arithmetic).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
         "--expt-relaxed-constexpr"]
# <T> (kernels before the cell template parameter) or <T, Gated> (Lb1E: lstm / normprop,
# Lb0E: relu / tanh / trec)
KINDS = {"I13__nv_bfloat16": "bf16", "I6__half": "fp16", "If": "fp32"}
CELLS = {"Lb1E": ",gated", "Lb0E": ",rnn"}
OPS = {"HMMA": r"^HMMA", "LDSM": r"^LDSM", "LDGSTS": r"^LDGSTS", "FFMA": r"^FFMA",
       "LDG": r"^LDG\.", "LDS": r"^LDS\b|^LDS\.", "BAR": r"^BAR\.SYNC", "MUFU": r"^MUFU"}


def _tool(name):
    try:
        import triton
        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if p.exists():
            return str(p)
    except ImportError:
        pass
    return shutil.which(name)


def _opcode(text):
    t = re.sub(r"^@!?U?P[T0-9]+\s+", "", text.strip())
    return t


def _count(instrs):
    return {k: sum(bool(re.search(p, _opcode(i))) for i in instrs) for k, p in OPS.items()}


def kernels(obj, cuobjdump):
    out = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    res = {}
    for chunk in re.split(r"\n\s*Function : ", out)[1:]:
        mangled = chunk.split("\n", 1)[0].strip()
        kind = next((v for k, v in KINDS.items() if re.search(k + "[EL]", mangled)), mangled)
        kind += next((v for k, v in CELLS.items() if k in mangled), "")
        base = "forward_kernel" if "forward_kernel" in mangled else "backward_kernel"
        ins = [(int(a, 16), t.strip()) for a, t in
               re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", chunk)]
        index = {a: i for i, (a, _) in enumerate(ins)}
        loops = []
        for i, (a, t) in enumerate(ins):
            m = re.search(r"\bBRA(?:\.\S+)?\s+(?:\S+,\s*)?0x([0-9a-f]+)", t)
            if m and int(m.group(1), 16) <= a and int(m.group(1), 16) in index:
                body = [x for _, x in ins[index[int(m.group(1), 16)]:i + 1]]
                loops.append({"start": hex(int(m.group(1), 16)), "end": hex(a),
                              "instructions": len(body), **_count(body)})
        res[f"{base}<{kind}>"] = {"instructions": len(ins), **_count([t for _, t in ins]),
                                  "loops": loops}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(HERE), help="directory with forward.cu / backward.cu")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                "bin", "nvcc")
    cuobjdump = _tool("cuobjdump")
    if not os.path.exists(nvcc) or cuobjdump is None:
        sys.exit("needs nvcc (CUDA_HOME) and cuobjdump (the triton wheel ships it)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    report = {"nvcc": version.strip().splitlines()[-2] if version else "?",
              "arch": "sm_90", "src": args.src, "kernels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("forward.cu", "backward.cu"):
            obj = Path(tmp) / (name + ".o")
            r = subprocess.run([nvcc, "-arch=sm_90", "-O3", "-std=c++17", "-Xptxas", "-v",
                                *FLAGS, "-c", str(Path(args.src) / name), "-o", str(obj)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"nvcc failed for {name}:\n{r.stderr[-3000:]}")
            log = r.stdout + r.stderr
            entries = re.findall(r"Compiling entry function '(\S+)'", log)
            regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
            spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            ks = kernels(obj, cuobjdump)
            for e, rg, (st, ld) in zip(entries, regs, spills):
                key = next(k for k in ks if k.split("<")[0] in e and
                           any(m in e for m, v in KINDS.items() if v == k[k.index("<") + 1:-1]))
                ks[key].update(registers=rg, spill_stores=int(st), spill_loads=int(ld))
            report["kernels"].update(ks)
    for k, v in sorted(report["kernels"].items()):
        print(f"{k}: {v.get('registers')} registers, {v.get('spill_stores')}+"
              f"{v.get('spill_loads')} B spilled, {v['instructions']} instructions, "
              f"HMMA {v['HMMA']}, LDSM {v['LDSM']}, LDGSTS {v['LDGSTS']}, FFMA {v['FFMA']}, "
              f"LDG {v['LDG']}")
        for lp in v["loops"]:
            if lp["HMMA"] or lp["LDGSTS"]:
                print(f"    loop {lp['start']}-{lp['end']}: {lp['instructions']} instructions, "
                      f"HMMA {lp['HMMA']}, LDSM {lp['LDSM']}, LDGSTS {lp['LDGSTS']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Hopper compile check of the Triton kernels (no GPU needed).

Every kernel (forward and backward of the tiled, persistent and per-step variants, the
persistent one both holding W_hh in registers and streaming it) is compiled for sm_90 by
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` with the tile sizes
that ``launch.plan`` picks for an H100 (132 SMs), so a kernel that only runs in the
interpreter cannot land.  This is a covering set, not the full product (4 cells x 4 dtypes
x 8 kernels, about six minutes of compiling): every cell with the tiled and persistent
kernels in bfloat16 (the per-step kernels with lstm and relu: the gate split/join and the
plain path), each other dtype (float16, float32 with and without TF32) on the kernels it
can reach, and the benchmark's persistent shapes as the rule plans them (LSTM H=1024 B=32
and 64, relu H=1024 B=32, LSTM H=512 B=256; bfloat16).  Register spills are read with
cuobjdump: none at the benchmark shapes except the KNOWN_SPILLS (bytes allowed, and why, per
Triton version where they differ), at most a few bytes of stack elsewhere (ptxas sometimes
spills 4-8 bytes at 128 registers); and no kernel may need more shared memory than an sm_90
block can have (it would fail at launch, which nothing here would otherwise see).
Issue 12: the normprop cell everywhere the LSTM is, and the kernels with their feature flags
on (cell norms; gradients of the norms), which plan() and the profile leave off.

The compiles run in a subprocess without ``TRITON_INTERPRET`` (conftest sets it for the
interpreter tests, and interpreted kernels cannot be compiled).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM_COUNT = 132  # H100 SXM
SMEM_MAX = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
KERNELS = {"tiled": ("fwd_tiled", "bwd_tiled"),
           "persistent": ("fwd_persistent", "bwd_persistent"),
           "step": ("fwd_step_launch", "bwd_step_launch")}
CELLS = ("lstm", "relu", "tanh", "trec", "normprop")
# the kernels' feature flags (launch.Plan fields; off in the fast path) per direction
FEATURES = {"forward": {"cell_norms": True},
            "backward": {"grad_norms": True, "grad_cell_norms": True}}


def _case(kernel, cell, dtype, tf32, B, H, variant, spill_bytes=64, features=False):
    name = f"{kernel}-{cell}-{dtype}{'-tf32' if tf32 else ''}-B{B}-H{H}" \
        f"{'-features' if features else ''}"
    return dict(id=name, kernel=kernel, cell=cell, dtype=dtype, tf32=tf32, B=B, H=H,
                variant=variant, spill_bytes=spill_bytes, features=features)


def _cases():
    out = []
    # every cell x tiled and persistent kernels, bfloat16; step: lstm and relu
    for cell in CELLS:
        small = 64 if cell in ("lstm", "normprop") else 128
        runs = [("tiled", small), ("persistent", 256)]
        if cell in ("lstm", "relu", "normprop"):
            runs.append(("step", 256))
        for variant, H in runs:
            for k in KERNELS[variant]:
                out.append(_case(k, cell, "bf16", False, 32, H, variant))
    # the other dtypes on the kernels each can reach (fp32 without TF32 takes the per-step
    # variant on a GPU: an FMA product with held operands spills)
    for k in KERNELS["persistent"]:
        out.append(_case(k, "lstm", "fp16", False, 32, 256, "persistent"))
        out.append(_case(k, "lstm", "fp32", True, 32, 256, "persistent"))
    for k in KERNELS["tiled"]:
        out.append(_case(k, "lstm", "fp32", True, 32, 32, "tiled"))
    for k in KERNELS["step"]:
        out.append(_case(k, "lstm", "fp32", False, 32, 256, None))
        out.append(_case(k, "relu", "fp32", False, 32, 512, None))
    # the benchmark's persistent shapes as the rule plans them: no spills, except the ones
    # in KNOWN_SPILLS (bytes allowed, and why)
    for cell, H, B in LARGEST:
        for k in KERNELS["persistent"]:
            allowed = (known_spill((k, cell, H, B)) or (0, ""))[0]
            out.append(_case(k, cell, "bf16", False, B, H, None, spill_bytes=allowed))
    # the one-gate forward's stacked K-halves (launch.plan KH = 2) in the other forms the rule
    # plans: fp16 with the halved batch tile, and B = 128, whose halved tile would not fit
    # the SMs (the tile stays 16 rows: the stacked operand has 32 columns)
    out.append(_case("fwd_persistent", "relu", "fp16", False, 32, 1024, None))
    out.append(_case("fwd_persistent", "tanh", "bf16", False, 128, 1024, None))
    # issue 12's feature flags on (cell norms forward; norm gradients backward): normprop on
    # every variant, and at the key shape as the rule plans it
    for variant, H in (("tiled", 64), ("persistent", 256), ("step", 256)):
        for k in KERNELS[variant]:
            out.append(_case(k, "normprop", "bf16", False, 32, H, variant, features=True))
    for k in KERNELS["persistent"]:
        allowed = (known_spill((k + "+features", "normprop", 1024, 32)) or (0, ""))[0]
        out.append(_case(k, "normprop", "bf16", False, 32, 1024, None, spill_bytes=allowed,
                         features=True))
    return out


LARGEST = (("lstm", 1024, 32), ("relu", 1024, 32), ("lstm", 1024, 64), ("lstm", 512, 256),
           ("normprop", 1024, 32))
# (kernel, cell, H, B): (stack bytes allowed, why), or {triton "major.minor": (bytes, why)}
# where the versions differ (an entry for the running version only) -- see docs/triton.md;
# the test fails when a kernel spills more, and test_known_spills_are_current when it no
# longer spills at all
KNOWN_SPILLS = {
    ("fwd_persistent", "lstm", 1024, 64): {
        "3.6": (288, "batch tile of 32 rows (B=64 on 132 SMs): the h tile doubles; none "
                     "with triton 3.9")},
    ("bwd_persistent", "lstm", 1024, 64): {
        "3.9": (24, "batch tile of 32 rows (2 row sub-tiles): about 6 loop-invariant "
                    "values; none with triton 3.6")},
    ("fwd_persistent", "lstm", 512, 256): (120, "batch tile of 64 rows (B=256 on 132 SMs)"),
    ("bwd_persistent", "lstm", 512, 256): {
        "3.6": (32, "batch tile of 64 rows (4 row sub-tiles of 16): 8 loop-invariant "
                    "addresses, reloaded with 8 LDL per step"),
        "3.9": (64, "batch tile of 64 rows (4 row sub-tiles of 16)")},
    # with the issue-12 feature flags on (not the fast path)
    ("fwd_persistent+features", "normprop", 1024, 32): {
        "3.6": (32, "cell norms: the rows of c_k each program reduces after the barrier; none "
                    "with triton 3.9")},
}


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return ".".join(triton.__version__.split(".")[:2])


def known_spill(key):
    """KNOWN_SPILLS[key] for the running Triton: (bytes, why), or None."""
    k = KNOWN_SPILLS.get(key)
    if isinstance(k, dict):
        k = k.get(_triton_version())
    return k


CASES = _cases()


# ---------------------------------------------------------------- runs in the subprocess

def _compile(case):
    """Compile one case with the static profile's compile helper (signature, constexprs from
    the plan, pointer divisibility: ``rnnreg_kernels.profile.triton.compile_one``) and read
    its registers and spills with cuobjdump."""
    import base64

    from rnnreg_kernels.profile import sass
    from rnnreg_kernels.profile import triton as prof

    from rnnreg_kernels.triton import launch

    name = case["kernel"]
    direction = "forward" if name.startswith("fwd") else "backward"
    job = dict(cell=case["cell"], B=case["B"], H=case["H"], dtype=case["dtype"],
               tf32=case["tf32"], sm_count=SM_COUNT, variant=case["variant"],
               direction=direction)
    plan = launch.plan
    if case["features"]:   # the profile compiles plan()'s fast path: switch the flags on
        launch.plan = lambda *a, **k: launch.with_features(plan(*a, **k), **FEATURES[direction])
    try:
        r = prof.compile_one(job)
    finally:
        launch.plan = plan
    if not r["ok"]:
        return dict(case, ok=False, error=r["error"])
    if r["name"] != name:
        return dict(case, ok=False, error=f"the rule planned {r['plan']}, not {name}")
    res = sass.resources(base64.b64decode(r["cubin"]))[r["name"]]
    return dict(case, ok=True, plan=repr(r["plan"]), seconds=r["seconds"],
                regs=res["registers"], stack=res["stack"], local=res["local"],
                shared=r["shared"])


def _main(argv):
    from concurrent.futures import ProcessPoolExecutor
    ids = set(argv[1:])
    todo = [c for c in CASES if not ids or c["id"] in ids]
    workers = max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as ex:
        results = list(ex.map(_compile, todo))
    print(json.dumps(results))


# ---------------------------------------------------------------- pytest side

@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"compile subprocess failed:\n{proc.stderr[-4000:]}")
    return {r["id"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_compiles_for_hopper(compiled, case):
    r = compiled[case["id"]]
    assert r["ok"], r["error"]
    assert r["stack"] <= case["spill_bytes"] and r["local"] == 0, \
        f"register spills on sm_90: {r['plan']} uses {r['regs']} registers, " \
        f"{r['stack']} bytes of stack, {r['local']} bytes of local memory (allowed: " \
        f"{case['spill_bytes']} bytes of stack)"
    assert r["shared"] <= SMEM_MAX, \
        f"{r['plan']} needs {r['shared']} bytes of shared memory, more than the {SMEM_MAX} " \
        f"an sm_90 block can have (it would not launch)"


def test_known_spills_are_current(compiled):
    """Each KNOWN_SPILLS entry still spills (else the allowance must go)."""
    for case in CASES:
        key = (case["kernel"] + ("+features" if case["features"] else ""), case["cell"],
               case["H"], case["B"])
        if case["variant"] is None and known_spill(key) is not None:
            r = compiled[case["id"]]
            assert r["ok"] and r["stack"] > 0, f"{case['id']} no longer spills: delete its " \
                                               f"KNOWN_SPILLS entry"


def test_persistent_rule_at_benchmark_sizes():
    """The rule keeps the H <= 1024 benchmark shapes (bfloat16) on the persistent variant
    with one program per SM and 64 gate rows per program, and sends H > 1024 (whose slices
    would fall below the warpgroup MMA's M) to the per-step variant."""
    torch = pytest.importorskip("torch")
    from rnnreg_kernels.triton import launch
    cuda = torch.device("cuda")
    for cell, H, B in (("lstm", 1024, 32), ("relu", 1024, 32), ("tanh", 1024, 32),
                       ("lstm", 650, 20), ("lstm", 768, 16), ("lstm", 512, 256),
                       ("lstm", 1024, 64), ("normprop", 1024, 32)):
        p = launch.plan(cell, B, H, torch.bfloat16, cuda, sm_count=SM_COUNT)
        assert p.variant == "persistent" and p.hold, p
        G = 4 if cell in ("lstm", "normprop") else 1
        assert p.NH * p.NB <= SM_COUNT and G * p.BH == 64, p
        assert not (p.cell_norms or p.grad_norms or p.grad_cell_norms), p
    for cell, H in (("lstm", 2048), ("relu", 2048)):
        assert launch.plan(cell, 32, H, torch.bfloat16, cuda, sm_count=SM_COUNT).variant == \
            "step"


if __name__ == "__main__":
    _main(sys.argv)

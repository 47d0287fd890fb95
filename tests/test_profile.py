"""Static-profile gates (sm_90 SASS, no GPU) and the SASS analysis they rest on.

The gate compiles the key shapes (``rnnreg_kernels.profile.baseline.GATE_SHAPES``: Triton
LSTM and relu at H=1024 B=32 bf16 with 132 SMs, the tiled LSTM H=64 B=32 bf16, and the CUDA
LSTM H=1024 B=32 bf16 when nvcc is there) and fails on

* any register spill (stack or local memory, or STL/LDL in the step);
* a step product without tensor-core instructions where the dtype allows them (bf16, fp16,
  tf32) -- per backend, see ``TENSOR_CORES_REQUIRED``;
* ``instructions_per_warp_per_step`` more than 10 % above ``tests/profile_baseline.json``
  (its section for the running Triton version / nvcc version).

After an intended kernel change, update the baseline in the same commit (say why in the
message)::

    python -m rnnreg_kernels.profile.baseline --update            # this Triton + nvcc
    /path/to/other-triton/python -m rnnreg_kernels.profile.baseline --update --only triton

The compiles run in one subprocess without ``TRITON_INTERPRET`` (a pool of 2 processes).
"""
import json
import os
import subprocess
import sys

import pytest

from rnnreg_kernels.profile import baseline, model, sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one-line switch per backend (the CUDA step product is on tensor cores since issue 9)
TENSOR_CORES_REQUIRED = {"triton": True, "cuda": True}
TC_DTYPES = ("bf16", "fp16")
RECORD_KEYS = ("name", "direction", "plan", "registers", "spill_bytes", "shared_bytes",
               "tensor_core_ops_per_step", "fma_ops_per_step",
               "instructions_per_warp_per_step", "global_load_bytes_per_step",
               "estimated_us_per_step")

# A kernel with a time loop (0x0030-0x0150) that holds a counted inner loop (0x0080-0x00c0)
# and a barrier spin loop (0x00f0-0x0110), as nvdisasm -g prints it.
SNIPPET = """
//--------------------- .text.toy                --------------------------
\t.section\t.text.toy,"ax",@progbits
        .global         toy
toy:
.text.toy:
\t//## File "toy.py", line 1
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   IMAD.MOV.U32 R2, RZ, RZ, RZ ;
.L_x_0:
\t//## File "toy.py", line 3
        /*0030*/                   LDG.E R9, desc[UR4][R30.64] ;
        /*0040*/                   LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0050*/                   HMMA.16816.F32.BF16 R12, R4, R6, RZ ;
        /*0060*/                   HMMA.16816.F32.BF16 R12, R4, R6, R12 ;
        /*0070*/                   IMAD.MOV.U32 R3, RZ, RZ, RZ ;
.L_x_1:
\t//## File "toy.py", line 5
        /*0080*/                   LDG.E.64 R16, desc[UR4][R10.64] ;
        /*0090*/                   FFMA R20, R16, R17, R20 ;
        /*00a0*/                   IADD3 R3, R3, 0x1, RZ ;
        /*00b0*/                   ISETP.GE.AND P0, PT, R3, 0x4, PT ;
        /*00c0*/              @!P0 BRA `(.L_x_1) ;
\t//## File "toy.py", line 7
        /*00d0*/                   STG.E [R8.64], R12 ;
        /*00e0*/                   RED.E.ADD.STRONG.GPU [R22.64], R24 ;
.L_x_2:
        /*00f0*/                   LDG.E.STRONG.GPU R26, desc[UR4][R22.64] ;
        /*0100*/                   ISETP.GE.AND P1, PT, R26, R27, PT ;
        /*0110*/              @!P1 BRA `(.L_x_2) ;
\t//## File "toy.py", line 3
        /*0120*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0130*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0140*/                   ISETP.GE.AND P2, PT, R2, c[0x0][0x210], PT ;
        /*0150*/              @!P2 BRA `(.L_x_0) ;
        /*0160*/                   EXIT ;
.L_x_3:
        /*0170*/                   BRA `(.L_x_3);
"""


def _toy():
    return sass.parse_function(SNIPPET)


def _inner_trip(fn, loop):
    return (4, "toy: 4 K-chunks") if fn.blocks[loop.header].start == 0x80 else (None, "?")


# ---------------------------------------------------------------- the SASS analysis

def test_parser_reads_predicates_opcodes_operands_and_lines():
    fn = _toy()
    by = {i.addr: i for i in fn.insns}
    assert by[0xC0].pred == "!P0" and by[0xC0].opcode == "BRA" and by[0xC0].target == ".L_x_1"
    assert by[0x40].opcode == "LDG.E.128" and by[0x40].width() == 16
    assert by[0x40].operands == ["R4", "desc[UR4][R8.64]"]
    assert by[0x80].width() == 8 and by[0x30].width() == 4
    assert by[0x50].base == "HMMA" and by[0x50].operands[-1] == "RZ"
    assert (by[0x90].file, by[0x90].line) == ("toy.py", 5)
    # a 128-bit load writes 4 registers; HMMA.16816.F32 reads a 4-register A operand
    assert by[0x40].regs_written() == ["R4", "R5", "R6", "R7"]
    assert {"R4", "R5", "R6", "R7", "R12", "R13"} <= set(by[0x60].regs_read())
    assert by[0xB0].regs_written() == ["P0"]


def test_blocks_and_nested_loops_with_spin_loop():
    fn = _toy()
    starts = [b.start for b in fn.blocks]
    assert starts == [0x0, 0x30, 0x80, 0xD0, 0xF0, 0x120, 0x160, 0x170]
    loops = {fn.blocks[lp.header].start: lp for lp in fn.loops}
    assert set(loops) == {0x30, 0x80, 0xF0}   # the BRA-to-self after EXIT is unreachable
    outer, inner, spin = loops[0x30], loops[0x80], loops[0xF0]
    assert inner.parent is outer and spin.parent is outer and outer.parent is None
    assert spin.spin and not inner.spin and not outer.spin
    assert [fn.blocks[b].start for b in outer.own_blocks()] == [0x30, 0xD0, 0x120]
    tl, rule = sass.find_time_loop(fn)
    assert tl is outer and "grid barrier" in rule


def test_step_counts_weight_inner_loops_and_count_the_spin_once():
    r = sass.analyze(_toy(), _inner_trip, warps=4)
    c = r["counts"]
    # the time loop's own 11 + inner 5 x 4 trips + spin 3 x 1
    assert c.instructions == 11 + 5 * 4 + 3
    assert c.tensor_core == 2 and c.fma == 4
    assert c.global_loads == 2 + 4 + 1
    assert c.global_load_bytes_per_warp == (4 + 16 + 4 * 8 + 4) * 32
    assert c.load_widths == {"LDG": 2.0, "LDG.128": 1.0, "LDG.64": 4.0}
    assert c.bar_sync == 1 and c.grid_barriers == 1 and c.atomics == 1
    assert c.global_stores == 1
    assert r["dependent_tensor_core_chain"] == 2        # R12 feeds the second HMMA
    assert r["exchange_round_trips"] == 2               # R9 is the address of the 128-bit load
    trips = {lp["header"]: lp["trips"] for lp in r["loops"]}
    assert trips == {"0x0080": 4, "0x00f0": 1}
    assert r["unweighted_loops"] == []


def test_unknown_trip_count_counts_once_and_is_reported():
    r = sass.analyze(_toy(), lambda fn, lp: (None, "unknown"), warps=4)
    assert r["counts"].instructions == 11 + 5 + 3
    assert [u["header"] for u in r["unweighted_loops"]] == ["0x0080"]


def test_without_a_barrier_the_outermost_working_loop_is_the_step():
    text = SNIPPET.replace("RED.E.ADD.STRONG.GPU [R22.64], R24", "NOP").replace(
        "LDG.E.STRONG.GPU R26", "LDG.E R26")
    fn = sass.parse_function(text)
    tl, rule = sass.find_time_loop(fn)
    assert fn.blocks[tl.header].start == 0x30 and "tensor-core" in rule
    r = sass.analyze(fn, _inner_trip)
    assert r["exchange_round_trips"] == 0      # no grid barrier: the state stays on chip
    assert r["counts"].grid_barriers == 0


def test_irreducible_region_is_one_loop():
    # two entries (0x10 falls into A, 0x00 jumps into B): A <-> B is one loop, not two
    text = """
\t.section\t.text.irr,"ax",@progbits
.text.irr:
        /*0000*/              @P0 BRA `(.L_x_1) ;
.L_x_0:
        /*0010*/                   FFMA R1, R2, R3, R1 ;
.L_x_1:
        /*0020*/                   FFMA R4, R5, R6, R4 ;
        /*0030*/              @P1 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
"""
    fn = sass.parse_function(text)
    assert len(fn.loops) == 1 and fn.loops[0].irreducible
    assert not fn.loops[0].children


def test_parse_function_errors_name_the_problem():
    with pytest.raises(ValueError, match="no function"):
        sass.parse_function("nothing here")
    with pytest.raises(ValueError, match="not in the SASS text"):
        sass.parse_function(SNIPPET, "other")


def test_model_is_monotone_and_documented():
    base = model.estimate(1000, 8, 10, 1, 1, 5)["estimated_us_per_step"]
    assert model.estimate(900, 8, 10, 1, 1, 5)["estimated_us_per_step"] < base
    assert model.estimate(1000, 8, 10, 0, 1, 5)["estimated_us_per_step"] < base
    assert model.estimate(1000, 8, 10, 1, 0, 5)["estimated_us_per_step"] < base
    assert model.estimate(1000, 4, 10, 1, 1, 5)["estimated_us_per_step"] < base
    assert model.estimate(10, 8, 200, 1, 1, 5)["bound"] == "tensor-core chain"
    # more programs than SMs can hold at once: waves serialize
    one = model.estimate(1000, 4, 10, 1, 0, 5, programs=132, sm_count=132, registers=255)
    more = model.estimate(1000, 4, 10, 1, 0, 5, programs=1024, sm_count=132, registers=255)
    assert one["waves"] == 1 and more["waves"] > 1
    assert more["estimated_us_per_step"] > one["estimated_us_per_step"]
    for name, c in model.describe()["constants"].items():
        assert c["source"] and "value" in c, name


def _nest_sass(path, outer, mid, inner):
    """SASS of three nested loops whose line information points at ``path``: the loop
    statements at lines ``outer`` (0x10-0x50), ``mid`` (0x20-0x40), ``inner`` (0x30)."""
    return f"""
\t.section\t.text.nest,"ax",@progbits
.text.nest:
\t//## File "{path}", line {outer}
        /*0000*/                   IMAD.MOV.U32 R2, RZ, RZ, RZ ;
.L_x_0:
        /*0010*/                   STG.E [R8.64], R2 ;
.L_x_1:
\t//## File "{path}", line {mid}
        /*0020*/                   IADD3 R3, R3, 0x1, RZ ;
.L_x_2:
\t//## File "{path}", line {inner}
        /*0030*/              @P0 BRA `(.L_x_2) ;
\t//## File "{path}", line {mid}
        /*0040*/              @P1 BRA `(.L_x_1) ;
\t//## File "{path}", line {outer}
        /*0050*/              @P2 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""


TOY_TRITON = """import triton.language as tl


def kern(T, B, H, BB: tl.constexpr, BK: tl.constexpr):
    pid_b = tl.program_id(1)
    stride = tl.num_programs(1) * BB
    for k in range(1, T + 1):
        for b0 in range(pid_b * BB, B, stride):
            for k0 in range(0, H, BK):
                pass
"""


def test_triton_trip_rule_reads_the_range_with_the_plan(tmp_path):
    from rnnreg_kernels.profile import triton as prof
    src = tmp_path / "toy_kernel.py"
    src.write_text(TOY_TRITON)
    fn = sass.parse_function(_nest_sass(src, 7, 8, 9))
    rule = prof.trip_rule({"BB": 8, "BK": 16, "variant": "persistent"}, (4, 2), B=40, H=64)
    r = sass.analyze(fn, rule)
    assert r["time_loop"]["statement"] == "for k in range(1, T + 1):"
    trips = {lp["header"]: lp["trips"] for lp in r["loops"]}
    # b0: range(0, 40, 2 * 8) = 3 tiles; k0: range(0, 64, 16) = 4 chunks
    assert trips == {"0x0020": 3, "0x0030": 4}
    assert r["counts"].instructions == 1 + 1 + 3 * (1 + 1 + 4 * 1)   # STG+BRA, mid, inner
    assert not r["unweighted_loops"]
    # T is not known from the plan: a loop over T inside the step counts once, reported
    rule_t = prof.trip_rule({"BB": 8, "BK": 16}, (4, 2), B=40, H=64)
    fn2 = sass.parse_function(_nest_sass(src, 8, 7, 9))
    r2 = sass.analyze(fn2, rule_t)
    assert [u["statement"] for u in r2["unweighted_loops"]] == ["for k in range(1, T + 1):"]


def test_cuda_trip_rule_reads_the_for_header_with_the_plan(tmp_path):
    from rnnreg_kernels.profile import cuda as prof
    src = tmp_path / "forward.cu"
    src.write_text("  for (int k = 1; k <= T_; ++k) {\n"
                   "    for (int b0 = 0; b0 < B; b0 += bs) {\n"
                   "      for (int idx = tid; idx < nb * Hp; idx += kThreads) {\n")
    p = prof.plan("lstm", 32, 1024, "bf16", 132)
    assert (p["units"], p["blocks"]) == (8, 128)
    rule = prof.trip_rule("forward", "lstm", 32, 1024, p)
    r = sass.analyze(sass.parse_function(_nest_sass(src, 1, 2, 3)), rule)
    nb = min(p["bs_fwd"], 32)
    trips = {lp["header"]: lp["trips"] for lp in r["loops"]}
    assert trips == {"0x0020": -(-32 // p["bs_fwd"]), "0x0030": -(-nb * 1024 // 256)}


# ---------------------------------------------------------------- the CLI

def test_measure_without_gpu_exits_2_with_reason(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --measure runs (benchmarks/gpu_run.sh)")
    from rnnreg_kernels.__main__ import main
    rc = main(["profile", "--cell", "lstm", "--hidden", "64", "--batch", "4", "--dtype",
               "bf16", "--measure"])
    err = capsys.readouterr().err
    assert rc == 2 and "--measure" in err and ("CPU build" in err or "no CUDA" in err)


def test_measure_arithmetic_on_cpu():
    """The --measure code path (inputs, op calls, T=200 minus T=100) on the reference
    backend on CPU: one number per direction, finite, recorded with how it was taken."""
    torch = pytest.importorskip("torch")
    from rnnreg_kernels.profile.measure import measure
    result = {"kernels": [{"direction": "forward"}, {"direction": "backward"}]}
    measure(result, "reference", "relu", 8, 3, "fp32", False, reps=1, device="cpu")
    for k in result["kernels"]:
        assert isinstance(k["measured_us_per_step"], float)
        assert abs(k["measured_us_per_step"]) < 1e6 and "T=100 and T=200" in k["measured_how"]
    assert set(result["measured"]["median_ms"]) == {"fwd100", "fwd200", "train100",
                                                    "train200"}
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("args,needle", [
    (["--hidden", "0"], "--hidden: expected a positive integer, got 0"),
    (["--hidden", "x"], "--hidden: expected a positive integer, got 'x'"),
    (["--hidden", "8", "--dtype", "int8"], "invalid choice: 'int8'"),
])
def test_bad_arguments_exit_2(capsys, args, needle):
    from rnnreg_kernels.__main__ import main
    argv = ["profile", "--cell", "lstm", "--batch", "4", "--dtype", "bf16", *args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_cuda_backend_rejects_float64_with_exit_2(capsys):
    from rnnreg_kernels.__main__ import main
    rc = main(["profile", "--backend", "cuda", "--cell", "relu", "--hidden", "8", "--batch",
               "2", "--dtype", "fp64"])
    assert rc == 2 and "supports fp32, bf16 and fp16, got 'fp64'" in capsys.readouterr().err


def test_profile_function_checks_its_arguments():
    from rnnreg_kernels import profile
    with pytest.raises(ValueError, match="hidden: expected a positive integer, got 0"):
        profile.profile("triton", "lstm", 0, 4, "bf16")
    with pytest.raises(ValueError, match="backend: expected one of triton, cuda, got 'x'"):
        profile.profile("x", "lstm", 8, 4, "bf16")


# ---------------------------------------------------------------- the gate

@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("profile") / "gate.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "rnnreg_kernels.profile.baseline", "--json",
                           str(out), "--workers", "2"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"the profile subprocess failed:\n{proc.stdout[-2000:]}\n"
                    f"{proc.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def _records(gate):
    return [r for r in gate["records"] if "error" not in r]


def _ids():
    return [f"{b}-{c}-H{h}-B{bb}-{d}" for b, c, h, bb, d in baseline.GATE_SHAPES]


@pytest.mark.parametrize("shape", baseline.GATE_SHAPES, ids=_ids())
def test_gate_kernels_compile(gate, shape):
    skipped = [s for s in gate["skipped"] if tuple(s["shape"]) == shape]
    if skipped:
        pytest.skip(skipped[0]["reason"])
    errors = [r for r in gate["records"] if tuple(r["shape"]) == shape and "error" in r]
    assert not errors, errors
    recs = [r for r in _records(gate) if tuple(r["shape"]) == shape]
    assert sorted(r["direction"] for r in recs) == ["backward", "forward"]
    for r in recs:
        assert all(k in r for k in RECORD_KEYS), sorted(set(RECORD_KEYS) - set(r))
        assert r["instructions_per_warp_per_step"] > 0 and r["estimated_us_per_step"] > 0
        assert r["time_loop"], f"{r['name']}: no time loop found"
        if shape[0] == "triton":
            assert not r["unweighted_loops"], r["unweighted_loops"]


@pytest.mark.parametrize("shape", baseline.GATE_SHAPES, ids=_ids())
def test_gate_no_spills(gate, shape):
    """No kernel of the gate spills: no stack, no local memory, no STL/LDL in the step (the
    LSTM backward's 272 B of spilled addresses are gone since issue 8, session 3)."""
    for r in (r for r in _records(gate) if tuple(r["shape"]) == shape):
        assert r["spill_bytes"] == 0 and r["spill_instructions_per_step"] == 0, (
            f"{r['name']} ({r['direction']}) spills on sm_90: {r['registers']} registers, "
            f"{r['stack_bytes']} B stack, {r['local_bytes']} B local, "
            f"{r['spill_instructions_per_step']} STL/LDL per step, plan {r['plan']}")


@pytest.mark.parametrize("shape", baseline.GATE_SHAPES, ids=_ids())
def test_gate_tensor_cores_in_the_step(gate, shape):
    backend, dtype = shape[0], shape[4]
    if not TENSOR_CORES_REQUIRED[backend] or dtype not in TC_DTYPES:
        pytest.skip(f"tensor cores not required for {backend} {dtype}")
    for r in (r for r in _records(gate) if tuple(r["shape"]) == shape):
        assert r["tensor_core_ops_per_step"] > 0, (
            f"{r['name']} ({r['direction']}): the step product has no tensor-core "
            f"instruction (opcodes per step: {dict(list(r['opcodes_per_step'].items())[:8])})")


@pytest.mark.parametrize("shape", baseline.GATE_SHAPES, ids=_ids())
def test_gate_instructions_within_baseline(gate, shape):
    base = baseline.load()
    rows = [row for row in baseline.compare(gate, base)
            if row["key"].startswith(baseline.key(*shape, ""))]
    if not rows:
        pytest.skip("no records for this shape")
    for row in rows:
        assert row["baseline"] is not None, (
            f"{row['key']}: no entry in tests/profile_baseline.json section "
            f"[{row['section']}]; run `python -m rnnreg_kernels.profile.baseline --update`")
        assert row["ok"], (
            f"{row['key']}: {row['now']} instructions per warp per step, more than 10 % above "
            f"the baseline {row['baseline']} [{row['section']}]; if intended, update the "
            f"baseline (python -m rnnreg_kernels.profile.baseline --update) in the same commit")


def test_gate_persistent_step_has_only_the_barrier_loop(gate):
    """The persistent LSTM H=1024 B=32 kernels run one batch tile per program with W held, so
    inside the time loop the only loop left is the grid barrier's spin loop, counted once
    (the trip-count weighting of other inner loops is tested on the snippet above); a step
    that grew a loop again would have to state its trip count here."""
    for rec in (r for r in _records(gate) if tuple(r["shape"]) ==
                ("triton", "lstm", 1024, 32, "bf16")):
        inner = [lp for lp in rec["loops"] if lp["depth"] >= 1]
        assert inner and all("spin loop" in (lp["how"] or "") and lp["trips"] == 1
                             for lp in inner), rec["loops"]

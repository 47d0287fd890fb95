"""The Triton kernels against the reference backend (CPU: Triton interpreter).

Every launch variant (tiled, persistent, one launch per step) runs every cell with every
penalty, ``ns_include_initial``, ``ar_mask``, ragged lengths (a row of length 1), reverse and
T = 1, at awkward sizes (B = 3, H = 5 and 50), and several programs per launch (batch tiles
of 2 rows; 4 hidden slices for the per-step variant).  The persistent variant runs with one
program per barrier group (the interpreter runs programs one at a time, so a multi-program
barrier would spin forever); the per-step variant covers multi-program exchange.  Every
output and every gradient (with random upstream gradients on output, h_n, c_n and each
penalty term) is compared: float64 tightly, float32 against the float32 reference's own
error.  Every buffer is NaN-poisoned before the launch, so an unwritten element fails.
"""
import functools
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

import rnnreg_kernels  # noqa: E402
from rnnreg_kernels import reference  # noqa: E402
from rnnreg_kernels.contract import Spec, has_cell_state  # noqa: E402
from rnnreg_kernels.penalties import Penalties, penalty_weights  # noqa: E402
from rnnreg_kernels.triton import launch  # noqa: E402
import rnnreg_kernels.triton as tri  # noqa: E402

INTERPRET = launch.interpreting()
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("the triton backend needs TRITON_INTERPRET=1 or a CUDA GPU",
                allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# launch keywords per variant: several programs per launch where the variant allows it
VARIANTS = {
    "tiled": dict(variant="tiled", block_b=2),
    "persistent": dict(variant="persistent", block_b=2),
    "persistent-wide": dict(variant="persistent", block_b=4),
    "step": dict(variant="step", block_h=16, block_b=2),
}
PEN_ON = (0.3, 0.7, 0.5)
PEN_OFF = (0.0, 0.0, 0.0)
# name: (T, B, H, lengths, reverse, ns_include_initial, ar_mask, penalties)
CONFIGS = {
    "ragged-fwd-H50": (5, 3, 50, [5, 1, 3], False, True, True, PEN_ON),
    "ragged-rev-H5": (5, 3, 5, [2, 5, 1], True, False, False, PEN_ON),
    "T1-rev-H5": (1, 3, 5, None, True, True, True, PEN_ON),
    "full-rev-H50-off": (4, 3, 50, None, True, False, False, PEN_OFF),
    "full-fwd-H5": (4, 3, 5, None, False, False, True, PEN_ON),
}
PER_CELL = {
    "lstm": ("ragged-fwd-H50", "ragged-rev-H5", "T1-rev-H5", "full-rev-H50-off"),
    "relu": ("ragged-fwd-H50", "ragged-rev-H5", "full-rev-H50-off"),
    "tanh": ("ragged-fwd-H50", "ragged-rev-H5", "T1-rev-H5"),
    "trec": ("ragged-fwd-H50", "ragged-rev-H5", "full-fwd-H5"),
}
F64_CASES = [(v, c, cfg) for v in ("tiled", "persistent", "step")
             for c, cfgs in PER_CELL.items() for cfg in cfgs]
F64_CASES += [("persistent-wide", "lstm", "ragged-rev-H5"),
              ("persistent-wide", "relu", "ragged-fwd-H50")]


def make_case(cell, config, dtype, seed=0, tf32=False, cell_norms=False, norm_grads=False,
              zero_init=False):
    """Inputs, penalties, spec and random upstream gradients for one configuration.

    ``cell_norms``: the spec asks for cell norms (LSTM-type cells); ``norm_grads``: random
    upstream gradients on the norms (and on the cell norms when computed);
    ``zero_init``: h0 = c0 = 0 with ns_eps = 0, so the initial norms are exactly 0."""
    T, B, H, lengths, reverse, ns_init, use_mask, pen = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    G = 4 if has_cell_state(cell) else 1

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

    case = dict(cell=cell, T=T, B=B, H=H)
    case["x"] = rnd(T, B, G * H)
    case["w"] = rnd(G * H, H, scale=1.2 / H ** 0.5)
    case["h0"] = rnd(B, H, scale=0.5)
    case["c0"] = rnd(B, H, scale=0.5) if G == 4 else None
    if zero_init:
        case["h0"].zero_()
        if G == 4:
            case["c0"].zero_()
    case["a"] = 0.5 + torch.rand(H, generator=g, dtype=torch.float64) if cell == "normprop" \
        else None
    case["mask"] = ((torch.rand(B, H, generator=g) > 0.3).double() / 0.7) if use_mask else None
    case["lengths"] = torch.tensor(lengths) if lengths is not None else None
    case["go"] = rnd(T, B, H)
    case["ghn"] = rnd(B, H)
    case["gcn"] = rnd(B, H) if G == 4 else None
    case["gt"] = rnd(3)
    case["gn"] = rnd(T + 1, B) if norm_grads else None
    case["gm"] = rnd(T + 1, B) if norm_grads and cell_norms else None
    eps = 0.0 if zero_init else 1e-9
    pens = Penalties(*pen, ns_include_initial=ns_init, ar_mask=case["mask"], ns_eps=eps)
    w = penalty_weights(pens, T, B, H, case["lengths"])
    case["pen"] = pens
    case["spec"] = Spec(cell=cell, theta=0.4, w_ns=w.ns, w_tar=w.tar, w_ar=w.ar,
                        ns_include_initial=ns_init, ns_eps=eps, reverse=reverse,
                        allow_tf32=tf32, h_scale=1.7 if cell == "normprop" else 1.0,
                        cell_norms=cell_norms)
    return case


ACC_KEYS = ("gt", "a", "gn", "gm")  # tensors in the accumulation dtype


def cast(case, dtype, device):
    """The case's tensors in ``dtype`` on ``device`` (lengths stay int64; cell scale, term
    and norm gradients in the accumulation dtype)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = {}
    for k, v in case.items():
        if isinstance(v, torch.Tensor):
            if k == "lengths":
                out[k] = v.to(device)
            elif k in ACC_KEYS:
                out[k] = v.to(device=device, dtype=acc)
            else:
                out[k] = v.to(device=device, dtype=dtype).contiguous()
        else:
            out[k] = v
    return out


def run_backend(mod_fwd, mod_bwd, c, **kw):
    """Forward + backward of one backend (contract v2): dict of every output and gradient."""
    spec = c["spec"]
    fw = mod_fwd(spec, c["x"], c["w"], c["h0"], c["c0"], c["mask"], c["lengths"], c["a"],
                 **kw)
    output, h_n, c_n, terms, norms, cell_norms, saved = fw
    gx, gw, gh0, gc0, ga = mod_bwd(spec, c["x"], c["w"], c["h0"], c["c0"], c["mask"],
                                   c["lengths"], c["a"], output, norms, cell_norms, saved,
                                   c["go"], c["ghn"], c["gcn"], c["gt"], c["gn"], c["gm"], **kw)
    res = dict(output=output, h_n=h_n, c_n=c_n, terms=terms, norms=norms,
               cell_norms=cell_norms, grad_x_proj=gx, grad_w_hh=gw, grad_h0=gh0,
               grad_c0=gc0, grad_cell_scale=ga)
    return {k: v for k, v in res.items() if v is not None}


def run_triton(c, **kw):
    return run_backend(launch.forward, launch.backward, c, poison=True, **kw)


def run_reference(c):
    return run_backend(reference.forward, reference.backward, c)


def assert_all_close(got, want, rtol, atol, what=""):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        assert got[k].dtype == want[k].dtype, f"{what} {k}: dtype {got[k].dtype} vs " \
                                             f"{want[k].dtype}"
        torch.testing.assert_close(got[k].cpu(), want[k].cpu(), rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"{what} {k}: {m}")


def assert_within_lowp_error(got, lowp, truth, eps, what=""):
    """|got - truth| <= 4 |lowp - truth| + 16 eps max|truth| per tensor, elementwise max."""
    for k in truth:
        t = truth[k].double().cpu()
        e_got = (got[k].double().cpu() - t).abs().max().item()
        e_ref = (lowp[k].double().cpu() - t).abs().max().item()
        bound = 4 * e_ref + 16 * eps * (t.abs().max().item() + 1.0)
        assert e_got <= bound, f"{what} {k}: error {e_got:.3g} vs the same-dtype reference's " \
                               f"{e_ref:.3g} (bound {bound:.3g})"


@pytest.mark.parametrize("variant,cell,config", F64_CASES,
                         ids=[f"{v}-{c}-{cfg}" for v, c, cfg in F64_CASES])
def test_float64_matches_reference(variant, cell, config):
    if DEVICE.type == "cuda":
        pytest.skip("float64 kernels run only in the interpreter")
    c = cast(make_case(cell, config, torch.float64), torch.float64, DEVICE)
    got = run_triton(c, **VARIANTS[variant])
    want = run_reference(c)
    assert_all_close(got, want, rtol=1e-9, atol=1e-11, what=f"{variant}/{cell}/{config}")


FP32_CASES = [(v, c, cfg, tf32) for v in ("tiled", "persistent", "step")
              for c, cfg, tf32 in (("lstm", "ragged-fwd-H50", False),
                                   ("relu", "ragged-rev-H5", True),
                                   ("tanh", "T1-rev-H5", False),
                                   ("trec", "full-fwd-H5", True))]


@pytest.mark.parametrize("variant,cell,config,tf32", FP32_CASES,
                         ids=[f"{v}-{c}-{cfg}-{'tf32' if t else 'ieee'}"
                              for v, c, cfg, t in FP32_CASES])
def test_float32_within_reference_error(variant, cell, config, tf32):
    """float32 (TF32 on/off: held vs streamed W in the persistent variant) vs float64 truth."""
    base = make_case(cell, config, torch.float64, tf32=tf32)
    truth = run_reference(cast(base, torch.float64, DEVICE))
    c32 = cast(base, torch.float32, DEVICE)
    got = run_triton(c32, **VARIANTS[variant])
    lowp = run_reference(c32)
    for k in lowp:
        assert got[k].dtype == lowp[k].dtype, k
    eps = 2.0 ** -10 if (tf32 and DEVICE.type == "cuda") else 2.0 ** -23
    assert_within_lowp_error(got, lowp, truth, eps, what=f"{variant}/{cell}/{config}")


# contract v2 (issue 12): the normprop cell (grad_cell_scale), cell norms, and the radial
# terms of upstream gradients on the norms / cell norms, in every variant.
# name: (cell, config, cell_norms, norm_grads, zero_init)
V2_CONFIGS = {
    "normprop-ragged-fwd-H50": ("normprop", "ragged-fwd-H50", True, True, False),
    "normprop-ragged-rev-H5": ("normprop", "ragged-rev-H5", True, True, False),
    "normprop-T1-rev-H5": ("normprop", "T1-rev-H5", True, True, False),
    "normprop-plain-full-rev-H50": ("normprop", "full-rev-H50-off", False, False, False),
    "normprop-zero-norms-H5": ("normprop", "full-fwd-H5", True, True, True),
    "lstm-cell-norms-ragged-rev-H5": ("lstm", "ragged-rev-H5", True, True, False),
    "lstm-cell-norms-no-grads-H5": ("lstm", "full-fwd-H5", True, False, False),
    "relu-norm-grads-ragged-fwd-H50": ("relu", "ragged-fwd-H50", False, True, False),
}
V2_CASES = [(v, name) for v in ("tiled", "persistent", "step") for name in V2_CONFIGS]
V2_CASES += [("persistent-wide", "normprop-ragged-rev-H5"),
             ("persistent-wide", "relu-norm-grads-ragged-fwd-H50")]


def make_v2(name, dtype=torch.float64, seed=0):
    cell, config, cell_norms, norm_grads, zero_init = V2_CONFIGS[name]
    return make_case(cell, config, dtype, seed=seed, cell_norms=cell_norms,
                     norm_grads=norm_grads, zero_init=zero_init)


@pytest.mark.parametrize("variant,name", V2_CASES, ids=[f"{v}-{n}" for v, n in V2_CASES])
def test_contract_v2_float64_matches_reference(variant, name):
    if DEVICE.type == "cuda":
        pytest.skip("float64 kernels run only in the interpreter")
    c = cast(make_v2(name), torch.float64, DEVICE)
    got = run_triton(c, **VARIANTS[variant])
    want = run_reference(c)
    cell, _, cell_norms, norm_grads, _ = V2_CONFIGS[name]
    assert ("grad_cell_scale" in want) == (cell == "normprop")
    assert ("cell_norms" in want) == cell_norms
    assert_all_close(got, want, rtol=1e-9, atol=1e-11, what=f"{variant}/{name}")


def test_norm_gradients_change_the_result():
    """The radial terms are not silently dropped: with upstream gradients on the norms and
    cell norms the kernels' gradients differ from those without, by what the reference
    says."""
    if DEVICE.type == "cuda":
        pytest.skip("float64 kernels run only in the interpreter")
    c = cast(make_v2("normprop-ragged-rev-H5"), torch.float64, DEVICE)
    without = dict(c, gn=None, gm=None)
    got_with = run_triton(c, **VARIANTS["tiled"])
    got_without = run_triton(without, **VARIANTS["tiled"])
    want_with, want_without = run_reference(c), run_reference(without)
    for k in ("grad_x_proj", "grad_h0", "grad_c0", "grad_cell_scale"):
        d_got = got_with[k] - got_without[k]
        d_want = want_with[k] - want_without[k]
        assert d_want.abs().max() > 1e-3, k
        torch.testing.assert_close(d_got, d_want, rtol=1e-9, atol=1e-11)


V2_FP32 = [(v, "normprop-ragged-fwd-H50") for v in ("tiled", "persistent", "step")]


@pytest.mark.parametrize("variant,name", V2_FP32, ids=[f"{v}-{n}" for v, n in V2_FP32])
def test_contract_v2_float32_within_reference_error(variant, name):
    base = make_v2(name)
    truth = run_reference(cast(base, torch.float64, DEVICE))
    c32 = cast(base, torch.float32, DEVICE)
    got = run_triton(c32, **VARIANTS[variant])
    lowp = run_reference(c32)
    assert set(got) == set(truth)
    for k in lowp:
        assert got[k].dtype == lowp[k].dtype, k
    assert_within_lowp_error(got, lowp, truth, 2.0 ** -23, what=f"{variant}/{name}")


def test_contract_v2_bad_input():
    """Missing / unexpected cell_scale and grad_cell_norms without cell norms: clear errors."""
    c = cast(make_v2("normprop-ragged-rev-H5"), torch.float64, DEVICE)
    args = (c["spec"], c["x"], c["w"], c["h0"], c["c0"], c["mask"], c["lengths"])
    with pytest.raises(ValueError, match="cell_scale.*normprop.*None"):
        launch.forward(*args, None)
    with pytest.raises(ValueError, match=r"cell_scale: expected shape \[5\]"):
        launch.forward(*args, c["a"][:3])
    lstm = cast(make_case("lstm", "ragged-rev-H5", torch.float64), torch.float64, DEVICE)
    largs = (lstm["spec"], lstm["x"], lstm["w"], lstm["h0"], lstm["c0"], lstm["mask"],
             lstm["lengths"])
    with pytest.raises(ValueError, match="cell_scale.*only the 'normprop' cell"):
        launch.forward(*largs, c["a"])
    output, h_n, c_n, terms, norms, cell_norms, saved = launch.forward(*largs, None)
    assert cell_norms is None
    gm = torch.zeros_like(norms)
    with pytest.raises(ValueError, match="grad_cell_norms.*cell_norms is None"):
        launch.backward(*largs, None, output, norms, None, saved, lstm["go"], lstm["ghn"],
                        lstm["gcn"], lstm["gt"], None, gm)
    with pytest.raises(ValueError, match=r"grad_norms: expected shape \[6, 3\]"):
        launch.backward(*largs, None, output, norms, None, saved, lstm["go"], lstm["ghn"],
                        lstm["gcn"], lstm["gt"], gm[:2], None)
    relu = make_case("relu", "full-fwd-H5", torch.float64)["spec"]
    from dataclasses import replace
    with pytest.raises(ValueError, match="cell_norms.*lstm, normprop"):
        launch.forward(replace(relu, cell_norms=True), c["x"][..., :5], c["w"][:5], c["h0"],
                       None, None, None, None)


@pytest.mark.parametrize("variant", ["tiled", "persistent", "step"])
def test_float16_within_same_dtype_error(variant):
    """float16 vs float64 truth, bounded by a float16 PyTorch recurrence's own error (the
    interpreter's bfloat16 dot is broken in triton 3.6, so bfloat16 runs on the GPU only)."""
    if DEVICE.type == "cuda":
        pytest.skip("test_triton_gpu.py covers float16 on the GPU")
    from test_triton_gpu import compare, make as make_gpu_case
    kw = dict(variant=variant, block_b=2)
    if variant == "step":
        kw["block_h"] = 8
    cell, lengths = ("lstm", [6, 1, 4]) if variant != "persistent" else ("tanh", [2, 6, 3])
    compare(make_gpu_case(cell, 6, 3, 20, lengths, reverse=variant != "tiled"),
            torch.float16, **kw)


@pytest.mark.parametrize("variant", ["tiled", "persistent", "step"])
def test_float16_normprop_within_same_dtype_error(variant):
    """float16 normprop with cell norms and norm gradients vs float64 truth, bounded by a
    float16 PyTorch recurrence's own error (the GPU file's helpers; bfloat16: GPU only)."""
    if DEVICE.type == "cuda":
        pytest.skip("test_triton_gpu.py covers normprop on the GPU")
    from test_triton_gpu import compare, make as make_gpu_case
    kw = dict(variant=variant, block_b=2)
    if variant == "step":
        kw["block_h"] = 16
    compare(make_gpu_case("normprop", 5, 3, 20, [5, 1, 3], reverse=variant == "step",
                          cell_norms=True, norm_grads=True), torch.float16, **kw)


# The persistent backward's K-split product (KS > 1: what the GPU plans use for 16 units per
# program) and its row sub-tiles (batch tiles of 32 and 64 rows: 2 and 4 sub-tiles of 16),
# which the interpreter's own plans (one program of 64 or more units: KS = 1) do not reach;
# forced with k_slices and block_b.  B = 40 puts real rows in the second and third
# sub-tiles and leaves rows of the last one past B.
KSPLIT_CONFIGS = {  # name: (T, B, H, lengths, reverse, ns_include_initial, ar_mask, pens)
    "B40-ragged-fwd-H50": (4, 40, 50, [4 - (3 * b) % 4 for b in range(39)] + [1], False,
                           True, True, PEN_ON),
    "B40-ragged-rev-H20": (3, 40, 20, [1 + (5 * b) % 3 for b in range(40)], True, False,
                           True, PEN_ON),
    "B3-full-rev-H60": (3, 3, 60, None, True, True, False, PEN_ON),
}
CONFIGS.update(KSPLIT_CONFIGS)
# name: (cell, config, k_slices, block_b, cell_norms and norm gradients)
KSPLIT = {
    "lstm-KS4-BB32": ("lstm", "B40-ragged-fwd-H50", 4, 32, False),
    "normprop-KS2-BB64-norms": ("normprop", "B40-ragged-rev-H20", 2, 64, True),
    "lstm-KS8-BB16": ("lstm", "B3-full-rev-H60", 8, 16, False),
    "relu-KS2-BB32": ("relu", "B40-ragged-fwd-H50", 2, 32, True),
}


def _ksplit_backends(name):
    cell, config, ks, bb, v2 = KSPLIT[name]
    kw = dict(variant="persistent", block_b=bb, poison=True)
    fwd = functools.partial(launch.forward, **kw)
    bwd = functools.partial(launch.backward, k_slices=ks, **kw)
    return cell, config, v2, fwd, bwd


@pytest.mark.parametrize("name", list(KSPLIT))
def test_persistent_backward_k_split_float64(name):
    if DEVICE.type == "cuda":
        pytest.skip("float64 kernels run only in the interpreter")
    cell, config, v2, fwd, bwd = _ksplit_backends(name)
    c = cast(make_case(cell, config, torch.float64, cell_norms=v2 and cell != "relu",
                       norm_grads=v2), torch.float64, DEVICE)
    got = run_backend(fwd, bwd, c)
    assert_all_close(got, run_reference(c), rtol=1e-9, atol=1e-11, what=f"k-split/{name}")


def test_persistent_backward_k_split_float16():
    """float16 through the K-split product with 2 row sub-tiles vs float64 truth, bounded by
    a float16 PyTorch recurrence's own error."""
    if DEVICE.type == "cuda":
        pytest.skip("test_triton_gpu.py covers the GPU plans")
    from test_triton_gpu import check, in_dtype, lowp_naive, make as make_gpu_case, run, \
        spec_of
    _, _, _, fwd, bwd = _ksplit_backends("lstm-KS4-BB32")
    c = make_gpu_case("lstm", 4, 40, 50, [4 - (3 * b) % 4 for b in range(40)], reverse=True)
    truth = run(reference.forward, reference.backward, spec_of(c), in_dtype(c, torch.float64))
    cd = in_dtype(c, torch.float16)
    got = run(fwd, bwd, spec_of(c), cd)
    check(got, lowp_naive(spec_of(c), cd), truth, 2.0 ** -10, "k-split fp16")


def test_k_slices_bad_input():
    c = cast(make_case("lstm", "ragged-rev-H5", torch.float64), torch.float64, DEVICE)
    args = (c["spec"], c["x"], c["w"], c["h0"], c["c0"], c["mask"], c["lengths"], None)
    out = launch.forward(*args, variant="persistent")
    rest = (out[0], out[4], None, out[6], c["go"], c["ghn"], c["gcn"], c["gt"])
    for bad in (3, 0, 32):
        with pytest.raises(ValueError, match=r"k_slices: expected a power of two from 1 to "
                                             r"pow2\(H\) = 16, got"):
            launch.backward(*args, *rest, variant="persistent", k_slices=bad)
    with pytest.raises(ValueError, match="k_slices: only the persistent variant"):
        launch.backward(*args, *rest, variant="step", k_slices=2)


# the persistent forward of the one-gate cells with its K-halves stacked along M (launch.plan:
# KH = 2) and its own batch tile (launch.forward_plan: BB 16 -> 8; the backward keeps 16):
# B = 17 leaves a last tile of one row, H = 50 pads K to 64 (two halves of 32)
STACKED = [("relu", torch.float16, False, None), ("trec", torch.float32, True, None),
           ("tanh", torch.float16, False, 4)]


@pytest.mark.parametrize("cell,dtype,tf32,block_b", STACKED,
                         ids=[f"{c}-{str(d)[6:]}{'-tf32' if t else ''}-bb{b}"
                              for c, d, t, b in STACKED])
def test_stacked_persistent_forward(cell, dtype, tf32, block_b):
    if DEVICE.type == "cuda":
        pytest.skip("test_triton_gpu.py covers the persistent forward on the GPU")
    from test_triton_gpu import compare, make as make_gpu_case
    B, H, T = 17, 50, 6
    p = launch.plan(cell, B, H, dtype, DEVICE, tf32, variant="persistent", block_b=block_b)
    f = launch.forward_plan(p)
    assert (p.KH, f.KH, f.NH) == (2, 2, 1), (p, f)
    assert (f.BB, f.NB) == ((8, 3) if block_b is None else (block_b, 5)), f
    assert p.BB == (16 if block_b is None else block_b), p
    lengths = [T - (5 * b) % T for b in range(B)]
    lengths[-1] = 1
    compare(make_gpu_case(cell, T, B, H, lengths, reverse=cell != "trec"), dtype, tf32,
            variant="persistent", block_b=block_b)


def test_forward_plan_of_the_key_shapes():
    """The forward's own tiling at H=1024 B=32 on 132 SMs: the one-gate cells stack K-halves
    and halve the batch tile (64 programs); the backward's plan and the LSTM keep theirs."""
    cuda = torch.device("cuda")
    for cell in ("relu", "tanh", "trec"):
        p = launch.plan(cell, 32, 1024, torch.bfloat16, cuda, sm_count=132)
        assert (p.variant, p.BB, p.NB, p.NH, p.KH) == ("persistent", 16, 2, 16, 2), p
        f = launch.forward_plan(p)
        assert (f.BB, f.NB, f.NH, f.NR, f.KH, f.fwd_tiles) == (8, 4, 16, 1, 2, None), f
    lstm = launch.plan("lstm", 32, 1024, torch.bfloat16, cuda, sm_count=132)
    assert lstm.KH == 1 and launch.forward_plan(lstm) == lstm, lstm
    # a grid that would no longer fit the SMs with half the tile keeps the tile (still KH=2)
    big = launch.plan("relu", 128, 1024, torch.bfloat16, cuda, sm_count=132)
    assert (big.NH * big.NB, big.KH, big.fwd_tiles) == (128, 2, None), big
    # fixed tiles (block_b), FMA types and K below two halves of 16 stack nothing new
    assert launch.plan("relu", 32, 1024, torch.bfloat16, cuda, block_b=16,
                       sm_count=132).fwd_tiles is None
    assert launch.plan("relu", 32, 16, torch.float16, cuda, variant="persistent",
                       sm_count=132).KH == 1


@pytest.mark.parametrize("cell", ["lstm", "relu"])
def test_recurrence_end_to_end(cell):
    """rnnreg_kernels.recurrence(..., backend="triton") through autograd vs the reference."""
    if DEVICE.type == "cuda":
        pytest.skip("float64 kernels run only in the interpreter")
    base = cast(make_case(cell, "ragged-rev-H5" if cell == "lstm" else "ragged-fwd-H50",
                          torch.float64), torch.float64, DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        leaves = [base[k].clone().requires_grad_(True) for k in ("x", "w", "h0")]
        if cell == "lstm":
            leaves.append(base["c0"].clone().requires_grad_(True))
        out = rnnreg_kernels.recurrence(*leaves, cell=cell, penalties=base["pen"],
                                        lengths=base["lengths"], reverse=base["spec"].reverse,
                                        backend=backend, theta=base["spec"].theta)
        loss = (out.output * base["go"]).sum() + (out.h_n * base["ghn"]).sum()
        if cell == "lstm":
            loss = loss + (out.c_n * base["gcn"]).sum()
        loss = loss + sum(t * g for t, g in zip(out.terms, base["gt"]))
        grads = torch.autograd.grad(loss, leaves)
        res = dict(output=out.output, h_n=out.h_n, penalty=out.penalty, norms=out.norms,
                   terms=torch.stack(list(out.terms)))
        if cell == "lstm":
            res["c_n"] = out.c_n
        res.update({f"grad{i}": g for i, g in enumerate(grads)})
        results[backend] = {k: v.detach() for k, v in res.items()}
    assert_all_close(results["triton"], results["reference"], rtol=1e-9, atol=1e-11,
                     what=f"recurrence/{cell}")


@pytest.mark.parametrize("cell", ["normprop", "lstm", "relu"])
def test_recurrence_v2_end_to_end(cell):
    """recurrence(..., backend="triton") with issue 12's terms (the cell norm-stabilizer,
    norm_target) and a user's own function of norms and cell norms, through autograd, vs
    the reference: every output, every term and the gradients of x_proj, w_hh, h0, c0 and
    cell_scale."""
    if DEVICE.type == "cuda":
        pytest.skip("float64 kernels run only in the interpreter")
    from dataclasses import replace
    lstm = has_cell_state(cell)
    base = cast(make_case(cell, "ragged-rev-H5", torch.float64), torch.float64, DEVICE)
    pen = replace(base["pen"], norm_target=0.6, norm_target_value=1.5,
                  cell_norm_stabilizer=0.4 if lstm else 0.0)
    g5 = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    names = ["x", "w", "h0"] + (["c0"] if lstm else []) + (["a"] if cell == "normprop" else [])
    results = {}
    for backend in ("triton", "reference"):
        leaves = {k: base[k].clone().requires_grad_(True) for k in names}
        out = rnnreg_kernels.recurrence(
            leaves["x"], leaves["w"], leaves["h0"], leaves.get("c0"), cell=cell,
            penalties=pen, lengths=base["lengths"], reverse=base["spec"].reverse,
            backend=backend, theta=base["spec"].theta, cell_scale=leaves.get("a"),
            h_scale=base["spec"].h_scale)
        assert (out.cell_norms is not None) == lstm
        loss = (out.output * base["go"]).sum() + (out.h_n * base["ghn"]).sum()
        loss = loss + sum(t * g for t, g in zip(out.terms, g5)) + out.norms.sin().sum()
        if lstm:
            loss = loss + (out.c_n * base["gcn"]).sum() + (out.cell_norms ** 2).sum()
        grads = torch.autograd.grad(loss, [leaves[k] for k in names])
        res = dict(output=out.output, h_n=out.h_n, penalty=out.penalty, norms=out.norms,
                   terms=torch.stack(list(out.terms)))
        if lstm:
            res.update(c_n=out.c_n, cell_norms=out.cell_norms)
        res.update({f"grad_{k}": g for k, g in zip(names, grads)})
        results[backend] = {k: v.detach() for k, v in res.items()}
    terms = results["reference"]["terms"]
    assert terms[4] != 0 and (terms[3] != 0) == lstm, terms  # norm_target, cell NS are on
    assert_all_close(results["triton"], results["reference"], rtol=1e-9, atol=1e-11,
                     what=f"recurrence v2/{cell}")


def test_auto_plan_under_the_interpreter():
    if not INTERPRET:
        pytest.skip("interpreter planning")
    cpu = torch.device("cpu")
    p = launch.plan("lstm", 3, 50, torch.float64, cpu)
    assert (p.variant, p.NH, p.hold) == ("persistent", 1, False)
    assert launch.plan("lstm", 3, 50, torch.bfloat16, cpu).variant == "tiled"
    assert launch.plan("relu", 3, 50, torch.float32, cpu, tf32=True).variant == "tiled"
    with pytest.raises(ValueError, match="use variant='step'"):
        launch.plan("relu", 3, 50, torch.float64, cpu, variant="persistent", block_h=16)
    with pytest.raises(ValueError, match="block_h"):
        launch.plan("relu", 3, 50, torch.float64, cpu, variant="tiled", block_h=16)


def test_variant_from_environment(monkeypatch):
    monkeypatch.setenv("RNNREG_TRITON_VARIANT", "step")
    assert launch.plan("relu", 3, 5, torch.float64, DEVICE).variant == "step"
    monkeypatch.setenv("RNNREG_TRITON_VARIANT", "fastest")
    with pytest.raises(ValueError, match="RNNREG_TRITON_VARIANT"):
        launch.plan("relu", 3, 5, torch.float64, DEVICE)


def test_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tri.unavailable_reason(torch.device("cpu")) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    why = tri.unavailable_reason(torch.device("cpu"))
    assert "CUDA GPU" in why and "TRITON_INTERPRET=1" in why and "reference" in why
    spec = make_case("relu", "full-fwd-H5", torch.float64)["spec"]
    x = torch.zeros(2, 3, 5, dtype=torch.int32)
    assert "int32" in tri.unsupported_reason(spec, x, x[0])
    assert tri.unsupported_reason(spec, x.double(), x[0].double()) is None
    # contract v2: the normprop cell and cell norms run in the kernels
    for name in ("normprop-ragged-rev-H5", "lstm-cell-norms-ragged-rev-H5"):
        v2 = make_v2(name)
        assert tri.unsupported_reason(v2["spec"], v2["x"], v2["w"]) is None, name
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    assert "not installed" in tri.unavailable_reason(torch.device("cuda"))


def test_import_does_not_load_triton():
    """Importing the backend package neither imports triton nor touches a GPU."""
    code = ("import sys, rnnreg_kernels; before = 'triton' in sys.modules; "
            "import rnnreg_kernels.triton as t; "
            "print(before, 'triton' in sys.modules, t.unavailable_reason('cpu') is not None)")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    before, after, has_reason = out.stdout.split()
    if before == "True":
        pytest.skip("rnnreg_kernels itself imports triton; nothing to check here")
    assert (after, has_reason) == ("False", "True")

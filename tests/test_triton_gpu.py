"""The Triton kernels on a CUDA GPU: float32 (with and without TF32), bfloat16, float16.

Each case runs forward and backward (random upstream gradients on output, h_n, c_n and each
penalty term) with every buffer NaN-poisoned before the launch, and compares every output
and gradient with the float64 reference.  Lower precision is judged against the error of a
plain PyTorch recurrence in the same dtype (state rounded to the dtype each step, fp32
accumulation: what cuDNN does), not against a fixed tolerance (test_triton.py uses the same
helpers for float16 in the interpreter).  Shapes follow the
benchmark sets; the persistent variant is checked at LSTM and relu H=1024 (bfloat16) and
must not fall back to the per-step variant there.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

from rnnreg_kernels import reference  # noqa: E402
from rnnreg_kernels.contract import Spec, has_cell_state  # noqa: E402
from rnnreg_kernels.ops import resolve_backend  # noqa: E402
from rnnreg_kernels.penalties import (Penalties, hidden_norms, penalty_weights,  # noqa: E402
                                      posthoc_terms, step_mask, to_processing_order)
from rnnreg_kernels.triton import launch  # noqa: E402

# the helpers also run on the CPU (interpreter): test_triton.py uses them for float16
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
H_SCALE = 1.5  # the normprop cases' h scale (1 / sigma_h)
EPS = {torch.float32: 2.0 ** -23, "tf32": 2.0 ** -10, torch.bfloat16: 2.0 ** -8,
       torch.float16: 2.0 ** -10}


def make(cell, T, B, H, lengths=None, reverse=False, seed=0, ns_init=True, mask=True,
         cell_norms=False, norm_grads=False):
    """One case; ``cell_norms``: the spec asks for cell norms (LSTM-type cells);
    ``norm_grads``: random upstream gradients on the norms (and cell norms)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    G = 4 if has_cell_state(cell) else 1

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEV)

    c = dict(cell=cell, T=T, B=B, H=H, reverse=reverse, cell_norms=cell_norms)
    c["x"] = rnd(T, B, G * H, scale=0.5)
    c["w"] = rnd(G * H, H, scale=1.0 / H ** 0.5)
    c["h0"] = rnd(B, H, scale=0.3)
    c["c0"] = rnd(B, H, scale=0.3) if G == 4 else None
    c["a"] = (0.5 + torch.rand(H, generator=g, dtype=torch.float64)).to(DEV) \
        if cell == "normprop" else None
    c["mask"] = ((torch.rand(B, H, generator=g) > 0.5).double() * 2).to(DEV) if mask else None
    c["lengths"] = None if lengths is None else torch.tensor(lengths, device=DEV)
    c["go"] = rnd(T, B, H)
    c["ghn"] = rnd(B, H)
    c["gcn"] = rnd(B, H) if G == 4 else None
    c["gt"] = rnd(3) * 10
    c["gn"] = rnd(T + 1, B) if norm_grads else None
    c["gm"] = rnd(T + 1, B) if norm_grads and cell_norms else None
    c["pen"] = Penalties(1.0, 2.0, 1.0, ns_include_initial=ns_init, ar_mask=c["mask"])
    return c


def spec_of(c, tf32=False):
    w = penalty_weights(c["pen"], c["T"], c["B"], c["H"], c["lengths"])
    return Spec(cell=c["cell"], theta=0.2, w_ns=w.ns, w_tar=w.tar, w_ar=w.ar,
                ns_include_initial=c["pen"].ns_include_initial, ns_eps=c["pen"].ns_eps,
                reverse=c["reverse"], allow_tf32=tf32,
                h_scale=H_SCALE if c["cell"] == "normprop" else 1.0,
                cell_norms=c["cell_norms"])


def in_dtype(c, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = dict(c)
    for k in ("x", "w", "h0", "c0", "mask", "go", "ghn", "gcn"):
        if c[k] is not None:
            out[k] = c[k].to(dtype).contiguous()
    for k in ("gt", "a", "gn", "gm"):
        if c[k] is not None:
            out[k] = c[k].to(acc)
    return out


def run(fwd, bwd, spec, c, **kw):
    """Forward + backward of one backend on contract v2: dict of outputs and gradients."""
    o = fwd(spec, c["x"], c["w"], c["h0"], c["c0"], c["mask"], c["lengths"], c["a"], **kw)
    output, h_n, c_n, terms, norms, cell_norms, saved = o
    gx, gw, gh0, gc0, ga = bwd(spec, c["x"], c["w"], c["h0"], c["c0"], c["mask"],
                               c["lengths"], c["a"], output, norms, cell_norms, saved, c["go"],
                               c["ghn"], c["gcn"], c["gt"], c["gn"], c["gm"], **kw)
    res = dict(output=output, h_n=h_n, c_n=c_n, terms=terms, norms=norms,
               cell_norms=cell_norms, grad_x_proj=gx, grad_w_hh=gw, grad_h0=gh0,
               grad_c0=gc0, grad_cell_scale=ga)
    return {k: v for k, v in res.items() if v is not None}


class _RoundGrad(torch.autograd.Function):
    """Identity whose gradient is rounded to ``dtype`` (dz is kept in the input dtype)."""

    @staticmethod
    def forward(ctx, z, dtype):
        ctx.dtype = dtype
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).to(g.dtype), None


def lowp_naive(spec, c):
    """The recurrence in the input dtype as cuDNN runs it (h and dz rounded to the dtype each
    step, fp32 accumulation), penalties post hoc; gradients by autograd.  Same keys as
    ``run``."""
    dtype, acc = c["x"].dtype, torch.float32
    leaves = {k: c[k].clone().requires_grad_(True) for k in ("x", "w", "h0", "c0", "a")
              if c[k] is not None}
    lstm = has_cell_state(spec.cell)
    T, B = c["x"].shape[:2]
    H = c["w"].shape[1]
    lengths = c["lengths"]
    xk = to_processing_order(leaves["x"], lengths, spec.reverse).to(acc)
    w = leaves["w"].to(acc)
    h = leaves["h0"]
    cc = leaves["c0"].to(acc) if lstm else None
    valid = step_mask(T, lengths, B, DEV)
    states = []
    cells = [cc]
    for k in range(T):
        z = _RoundGrad.apply(xk[k] + h.to(acc) @ w.t(), dtype)
        if lstm:
            zi, zf, zg, zo = z.chunk(4, 1)
            c_new = torch.sigmoid(zf) * cc + torch.sigmoid(zi) * torch.tanh(zg)
            if spec.cell == "normprop":
                h_new = torch.sigmoid(zo) * torch.tanh(leaves["a"] * c_new) * spec.h_scale
            else:
                h_new = torch.sigmoid(zo) * torch.tanh(c_new)
        elif spec.cell == "relu":
            h_new = torch.relu(z)
        elif spec.cell == "tanh":
            h_new = torch.tanh(z)
        else:
            h_new = torch.where(z > spec.theta, z, torch.zeros_like(z))
        h_new = h_new.to(dtype)
        v = valid[k].unsqueeze(1) if valid is not None else torch.ones_like(h_new, dtype=bool)
        h = torch.where(v, h_new, h)
        if lstm:
            cc = torch.where(v, c_new, cc)
            cells.append(torch.where(v, c_new, torch.zeros_like(c_new)))
        states.append(torch.where(v, h_new, torch.zeros_like(h_new)))
    hs = torch.stack(states, 0)
    # the backends' terms are NS, TAR, AR (the two norm-only terms are computed by ops)
    terms = posthoc_terms(leaves["h0"].to(acc), hs.to(acc), c["pen"], lengths)[:3]

    def masked_norms(first_and_states):
        n = hidden_norms(first_and_states.to(acc), spec.ns_eps)
        if valid is not None:
            n = torch.cat([n[:1], torch.where(valid, n[1:], 0.0)], 0)
        return n

    norms = masked_norms(torch.cat([leaves["h0"].unsqueeze(0), hs], 0))
    output = to_processing_order(hs, lengths, spec.reverse)
    res = dict(output=output, h_n=h, terms=terms, norms=norms)
    loss = (output * c["go"]).sum() + (h * c["ghn"]).sum() + (terms * c["gt"]).sum()
    if c["gn"] is not None:
        loss = loss + (norms * c["gn"]).sum()
    if lstm:
        res["c_n"] = cc.to(dtype)
        loss = loss + (res["c_n"] * c["gcn"]).sum()
    if spec.cell_norms:
        res["cell_norms"] = masked_norms(torch.stack(cells, 0))
        if c["gm"] is not None:
            loss = loss + (res["cell_norms"] * c["gm"]).sum()
    grads = torch.autograd.grad(loss.float(), list(leaves.values()))
    names = {"x": "grad_x_proj", "w": "grad_w_hh", "h0": "grad_h0", "c0": "grad_c0",
             "a": "grad_cell_scale"}
    for name, gr in zip(leaves, grads):
        res[names[name]] = gr
    return {k: v.detach() for k, v in res.items()}


def check(got, lowp, truth, eps, what):
    assert set(got) == set(truth), (sorted(got), sorted(truth))
    for k, t in truth.items():
        g = got[k].double()
        assert torch.isfinite(g).all(), f"{what} {k}: non-finite values (unwritten?)"
        e_got = (g - t).abs().max().item()
        e_ref = (lowp[k].double() - t).abs().max().item()
        bound = 4 * e_ref + 16 * eps * (t.abs().max().item() + 1.0)
        assert e_got <= bound, f"{what} {k}: error {e_got:.3g}, same-dtype PyTorch " \
                               f"{e_ref:.3g}, bound {bound:.3g}"


def compare(c, dtype, tf32=False, **kw):
    spec = spec_of(c, tf32)
    truth = run(reference.forward, reference.backward, spec_of(c), in_dtype(c, torch.float64))
    cd = in_dtype(c, dtype)
    got = run(launch.forward, launch.backward, spec, cd, poison=True, **kw)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        lowp = lowp_naive(spec, cd)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    eps = EPS["tf32"] if tf32 else EPS[dtype]
    check(got, lowp, truth, eps, f"{c['cell']} T{c['T']} B{c['B']} H{c['H']} {dtype} {kw}")
    return got


DTYPES = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
          (torch.float16, False)]
DT_IDS = ["fp32", "tf32", "bf16", "fp16"]
SHAPES = [  # cell, T, B, H, lengths, reverse
    ("lstm", 35, 20, 650, None, False),          # word-level
    ("lstm", 100, 32, 1000, None, True),         # char-level
    ("lstm", 50, 256, 512, None, False),         # large batch
    ("lstm", 40, 16, 64, "ragged", True),        # tiled
    ("relu", 100, 32, 1024, "ragged", False),    # IRNN
    ("tanh", 60, 8, 128, None, True),
    ("trec", 60, 8, 300, "ragged", False),
]


@pytest.mark.parametrize("dtype,tf32", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}-T{s[1]}-B{s[2]}-H{s[3]}"
                                               for s in SHAPES])
def test_auto_variant_matches_reference(shape, dtype, tf32):
    cell, T, B, H, lengths, reverse = shape
    if lengths == "ragged":
        lengths = [T - (7 * b) % T for b in range(B)]
        lengths[-1] = 1
    compare(make(cell, T, B, H, lengths, reverse), dtype, tf32)


@pytest.mark.parametrize("variant", ["tiled", "persistent", "step"])
@pytest.mark.parametrize("cell", ["lstm", "relu"])
def test_each_variant(cell, variant):
    H = 64 if variant == "tiled" else 384
    B = 24
    lengths = [20 - b % 20 for b in range(B)]
    c = make(cell, 20, B, H, lengths, reverse=True, mask=False)
    compare(c, torch.bfloat16, variant=variant)
    compare(c, torch.float32, tf32=False, variant=variant)


@pytest.mark.parametrize("cell,H,B,ragged", [
    ("lstm", 1024, 32, False), ("relu", 1024, 32, False),
    # the LSTM backward's K-split product at the key shape with ragged lengths (and reverse),
    # and with a batch tile of 32 rows (2 row sub-tiles of the product)
    ("lstm", 1024, 32, True), ("lstm", 1024, 64, True)],
    ids=["lstm-H1024-B32", "relu-H1024-B32", "lstm-H1024-B32-ragged-rev",
         "lstm-H1024-B64-ragged"])
def test_persistent_at_large_hidden(cell, H, B, ragged):
    p = launch.plan(cell, B, H, torch.bfloat16, DEV)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    if sms >= 128:
        assert p.variant == "persistent" and p.hold, p
    lengths = None
    if ragged:
        lengths = [50 - (7 * b) % 50 for b in range(B)]
        lengths[-1] = 1
    c = make(cell, 50, B, H, lengths, reverse=cell == "relu" or (ragged and B == 32))
    compare(c, torch.bfloat16)


@pytest.mark.parametrize("cell,B", [("relu", 32), ("tanh", 20), ("trec", 37)])
def test_stacked_persistent_forward_at_large_hidden(cell, B):
    """The one-gate persistent forward at H=1024 with K-halves stacked along M and its own
    batch tile (8 rows where the grid fits; B = 20 and 37 leave partial tiles), against the
    reference with ragged lengths, reverse and all three penalties, in bfloat16 (and
    float16 for relu)."""
    H, T = 1024, 30
    p = launch.plan(cell, B, H, torch.bfloat16, DEV)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    if sms >= 128:
        f = launch.forward_plan(p)
        assert (p.variant, f.KH, f.BB) == ("persistent", 2, 8), (p, f)
    lengths = [T - (7 * b) % T for b in range(B)]
    lengths[-1] = 1
    c = make(cell, T, B, H, lengths, reverse=cell != "trec")
    compare(c, torch.bfloat16)
    if cell == "relu":
        compare(c, torch.float16)


V2_SHAPES = [  # cell, T, B, H, lengths, reverse, cell_norms, norm_grads
    ("normprop", 50, 32, 1024, "ragged", True, True, True),   # persistent, the key shape
    ("normprop", 40, 16, 64, None, False, True, True),        # tiled
    ("normprop", 30, 20, 650, None, False, False, False),     # the plain cell
    ("lstm", 50, 32, 1024, None, False, True, True),
    ("relu", 50, 32, 1024, "ragged", True, False, True),
]


@pytest.mark.parametrize("shape", V2_SHAPES, ids=[
    f"{s[0]}-T{s[1]}-B{s[2]}-H{s[3]}{'-cellnorms' if s[6] else ''}"
    f"{'-normgrads' if s[7] else ''}" for s in V2_SHAPES])
def test_contract_v2_bf16(shape):
    """Issue 12 on the GPU, bfloat16 (the interpreter's bfloat16 dot is broken): normprop
    with grad_cell_scale, cell norms and the radial terms of the norms' gradients."""
    cell, T, B, H, lengths, reverse, cell_norms, norm_grads = shape
    if lengths == "ragged":
        lengths = [T - (7 * b) % T for b in range(B)]
        lengths[-1] = 1
    compare(make(cell, T, B, H, lengths, reverse, cell_norms=cell_norms,
                 norm_grads=norm_grads), torch.bfloat16)


@pytest.mark.parametrize("variant", ["tiled", "persistent", "step"])
def test_each_variant_normprop(variant):
    H = 64 if variant == "tiled" else 384
    B = 24
    lengths = [20 - b % 20 for b in range(B)]
    c = make("normprop", 20, B, H, lengths, reverse=True, mask=False, cell_norms=True,
             norm_grads=True)
    compare(c, torch.bfloat16, variant=variant)


def test_deterministic():
    c = in_dtype(make("lstm", 30, 16, 512, [30 - b for b in range(16)]), torch.bfloat16)
    spec = spec_of(c)
    a = run(launch.forward, launch.backward, spec, c)
    b = run(launch.forward, launch.backward, spec, c)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_auto_backend_picks_by_measurement(monkeypatch):
    """auto takes triton only where rnnreg_kernels/auto_wins.json has a measured win for this
    GPU, cell, dtype and shape (auto_rule); otherwise native (cuDNN + the fused penalty pass)."""
    from rnnreg_kernels import auto_rule

    c = make("lstm", 4, 3, 32)
    x, w = c["x"].to(torch.bfloat16), c["w"].to(torch.bfloat16)
    name = torch.cuda.get_device_name(x.device)
    monkeypatch.setattr(auto_rule, "load", lambda path=None: ())
    assert resolve_backend("auto", spec_of(c), x, w) == "native"
    win = auto_rule.Measured(name, "triton", "lstm", "bf16", 32, 3, True, 2.0, "test")
    monkeypatch.setattr(auto_rule, "load", lambda path=None: (win,))
    assert resolve_backend("auto", spec_of(c), x, w) == "triton"

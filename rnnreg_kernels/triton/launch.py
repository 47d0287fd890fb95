"""Host side of the Triton backend: pick a launch variant, allocate, launch.  No autograd.

Variants (docs/triton.md): ``tiled`` (one program per batch tile holds all of W_hh),
``persistent`` (programs own hidden slices and keep their W_hh slice on chip, grid barrier
per step), ``step`` (one launch per step, W_hh streamed).  :func:`plan` chooses by shape;
``variant=`` or the environment variable ``RNNREG_TRITON_VARIANT`` forces one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from ..contract import LSTM_CELLS, Spec, acc_dtype_of, gates_of
from . import bwd as _bwd
from . import fwd as _fwd

VARIANTS = ("tiled", "persistent", "step")
# What the static profile and the compile tests need to build a kernel's signature without a
# GPU: the kernels of each variant (forward, backward), the pointer arguments that hold the
# accumulation dtype (fp32 / fp64) rather than the input dtype, and the int32 scalars.  Every
# other argument named ``*_ptr`` points to the input dtype, except ``len_ptr`` (int64) and
# ``bar_ptr`` (int32); every other scalar is fp32.
KERNELS = {"tiled": ("fwd_tiled", "bwd_tiled"),
           "persistent": ("fwd_persistent", "bwd_persistent"),
           "step": ("fwd_step_launch", "bwd_step_launch")}
ACC_PTRS = frozenset({"act_ptr", "cs_ptr", "norms_ptr", "tpart_ptr", "part_ptr", "gterms_ptr",
                      "dc_ptr", "scale_ptr", "cnorms_ptr", "cpart_ptr", "gnorms_ptr",
                      "gcnorms_ptr", "gscale_ptr"})
INT_ARGS = frozenset({"T", "B", "H", "has_len", "has_mask", "rev", "ns_init", "k"})
CELL_CODE = {"lstm": 0, "relu": 1, "tanh": 2, "trec": 3, "normprop": 4}
TILED_MAX_W = 32768        # bytes of W_hh one tiled program holds (bf16: LSTM H <= 64, RNN 128)
PERSISTENT_MMA_M = 64      # gate rows per persistent program: the M of a warpgroup MMA
PERSISTENT_MAX_SMEM = 196608  # bytes of shared memory for a persistent program's W_hh slice
                              # and h tile (sm_90 allows 227 KB per block)
PERSISTENT_MAX_BB = 128    # largest batch tile (the MMA's N) of a persistent program
PERSISTENT_WARPS = 8       # two warpgroups: half the registers per thread of 4 warps


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _co_resident(device: torch.device) -> int:
    """How many programs may wait at one grid barrier: one per SM (1 in the interpreter)."""
    if device.type != "cuda" or interpreting():
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class Plan:
    """A launch configuration.

    ``BB`` batch rows per tile, ``BH`` hidden units per program, ``BK`` K-chunk of the step
    product (the padded H when W is held), ``NH`` hidden slices, ``NB`` batch tiles (for
    ``persistent``: barrier groups of NH programs, one tile each), ``NP`` = pow2(NH),
    ``hold``: W_hh stays on chip across steps (tensor-core types) or is streamed in
    BK-chunks (FMA types: fp32 without TF32, fp64).  ``HF`` = pow2(H) (the row stride of the
    persistent exchange buffer), ``NR`` the most rows whose norms one persistent program
    reduces per step, ``KS`` the K-slices of the persistent backward's step product (one per
    warp, at least 16 wide).  ``KH`` (forward only) the K-slices the persistent forward's
    product stacks along M, ``fwd_tiles`` (forward only) ``(BB, NB, NR)`` of the persistent
    forward when it tiles the batch differently from the backward (:func:`forward_plan`
    applies both).  ``cell_norms``, ``grad_norms``, ``grad_cell_norms`` are the
    kernels' feature flags (constexprs ``CELL_NORMS``, ``GRAD_NORMS``, ``GRAD_CELL_NORMS``):
    :func:`plan` leaves them off (the fast path, what the static profile compiles), the
    launchers switch them on per call (:func:`with_features`).
    """

    variant: str
    BB: int
    BH: int
    BK: int
    NH: int
    NB: int
    NP: int
    num_warps: int
    hold: bool
    HF: int = 16
    NR: int = 1
    KS: int = 1
    KH: int = 1
    fwd_tiles: Optional[tuple] = None
    cell_norms: bool = False
    grad_norms: bool = False
    grad_cell_norms: bool = False


def with_features(p: Plan, **flags) -> Plan:
    """``p`` with the feature flags ``flags`` (``cell_norms=`` etc.) set."""
    return dataclasses.replace(p, **{k: bool(v) for k, v in flags.items()})


def plan(cell: str, B: int, H: int, dtype: torch.dtype, device: torch.device,
         tf32: bool = False, variant: Optional[str] = None, block_h: Optional[int] = None,
         block_b: Optional[int] = None, sm_count: Optional[int] = None) -> Plan:
    """Choose the launch variant and its tiles (the rule is documented in docs/triton.md).

    Tensor-core types (fp16, bf16, fp32 with TF32): ``tiled`` when W_hh fits one program
    (G * pow2(H)^2 * size <= TILED_MAX_W); else ``persistent`` when a grid of hidden slices
    x batch tiles fits the co-resident programs (one per SM) with a W_hh slice and the h
    tile in shared memory; else ``step``.  FMA types (fp32 without TF32; fp64 in the
    interpreter) take ``step`` on a GPU (an FMA product cannot use the tensor cores and its
    held operands would not fit the registers) and ``persistent`` in the interpreter.
    ``variant`` (or env ``RNNREG_TRITON_VARIANT``), ``block_h`` and ``block_b`` override the
    choice; ``sm_count`` plans for a GPU with that many SMs (compile checks without a GPU).
    """
    if variant is None:
        variant = os.environ.get("RNNREG_TRITON_VARIANT") or None
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant (or RNNREG_TRITON_VARIANT): expected one of "
                         f"{', '.join(VARIANTS)}, got {variant!r}")
    G = gates_of(cell)
    hfull = max(16, _pow2(H))
    bb = _pow2(B)
    size = torch.empty(0, dtype=dtype).element_size()
    mma = dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and tf32)
    n_co = sm_count or _co_resident(device)
    tiles = _persistent_tiles(G, B, H, size, mma, n_co, block_h, block_b)
    if variant is None:
        variant = "step"
        if mma and G * hfull * hfull * size <= TILED_MAX_W:
            variant = "tiled"
        elif (mma or n_co == 1) and tiles is not None:
            variant = "persistent"
    if variant == "tiled":
        if block_h is not None and block_h < H:
            raise ValueError(f"block_h: the tiled variant needs block_h >= H = {H}, got "
                             f"{block_h}")
        BB = block_b or min(bb, 16 if G == 1 else 8)
        return Plan("tiled", BB, hfull, hfull, 1, triton.cdiv(B, BB), 1, 4, True, hfull)
    if variant == "persistent":
        if tiles is None:
            raise ValueError(
                f"variant 'persistent': no tiling of H = {H}, B = {B} fits the {n_co} "
                f"programs that can meet at a grid barrier here with a W_hh slice on chip"
                + (" (the interpreter runs programs one at a time: use block_h >= H)"
                   if interpreting() else "") + "; use variant='step'")
        BH, BB = tiles
        NH = triton.cdiv(H, BH)
        BK = hfull if mma else min(32, hfull)
        NR = _pow2(triton.cdiv(BB, NH))
        KS = _backward_k_slices(G, BH, hfull)
        KH, fwd_tiles = _forward_stacking(G, B, BB, NH, hfull, mma, n_co, block_b)
        return Plan("persistent", BB, BH, BK, NH, triton.cdiv(B, BB), _pow2(NH),
                    PERSISTENT_WARPS, mma, hfull, NR, KS, KH, fwd_tiles)
    BH = block_h or (32 if G == 1 else 8)
    BB = block_b or min(bb, 16)
    NH = triton.cdiv(H, BH)
    BK = min(64 if mma else 32, hfull)
    return Plan("step", BB, BH, BK, NH, triton.cdiv(B, BB), _pow2(NH), 4, False, hfull)


def _forward_stacking(G: int, B: int, BB: int, NH: int, hfull: int, mma: bool, n_co: int,
                      block_b: Optional[int]) -> tuple:
    """``(KH, fwd_tiles)`` of the persistent forward (``fwd.fwd_persistent``).

    One-gate cells with the W slice held (tensor-core types) and ``pow2(H) >= 32``: the
    product's K is split into KH = 2 slices stacked along M (``fwd._stacked_product``:
    ``[2*64, H/2] @ [H/2, 2*BB]``), so the two warpgroups of 8 warps each read half of W
    once per step instead of both reading all of it, and the accumulator chains are half
    as deep.  The stacked operand h' has 2*BB columns, so the forward halves the batch
    tile (``fwd_tiles = (BB/2, NB', NR')``: twice the programs, the MMA's N stays BB) when
    BB >= 16, the grid still fits the ``n_co`` co-resident programs and ``block_b`` does
    not fix the tile.  The LSTM-type cells (64 gate rows of 16 units) keep KH = 1."""
    if G != 1 or not mma or hfull < 32:
        return 1, None
    fwd_tiles = None
    if block_b is None and BB >= 16:
        bb = BB // 2
        nb = triton.cdiv(B, bb)
        if n_co == 1 or NH * nb <= n_co:
            fwd_tiles = (bb, nb, _pow2(triton.cdiv(bb, NH)))
    return 2, fwd_tiles


def forward_plan(p: Plan) -> Plan:
    """The plan ``forward`` launches for ``p`` (what :func:`plan` returns, shared with the
    backward): ``p`` with the forward's own batch tiling ``p.fwd_tiles`` applied, if any.
    The static profile compiles the forward with it."""
    if p.fwd_tiles is None:
        return p
    BB, NB, NR = p.fwd_tiles
    return dataclasses.replace(p, BB=BB, NB=NB, NR=NR, fwd_tiles=None)


def _backward_k_slices(G: int, BH: int, hfull: int) -> int:
    """K-slices of the persistent backward's product ``dz [BB, G*H] @ W[:, units]``.

    With BH >= 64 units the product, transposed (``W[:, units]^T @ dz^T``), fills a
    warpgroup MMA as one 2-D dot (KS = 1); smaller slices (LSTM: 16 units) would leave M at
    16 and replicate the MMA over the warps, so K is split into one slice per warp (a
    batched ``dz [KS, rows, H/KS] @ W [KS, H/KS, BH]``, then a sum), at least 16 wide."""
    if BH >= PERSISTENT_MMA_M:
        return 1
    return max(1, min(PERSISTENT_WARPS, hfull // 16))


def _check_k_slices(k_slices, p: Plan) -> int:
    """``k_slices`` for the persistent backward of plan ``p``: a power of two that divides
    ``p.HF``, at most ``p.HF``; else a ValueError naming it."""
    if p.variant != "persistent":
        raise ValueError(f"k_slices: only the persistent variant splits K; the plan is "
                         f"{p.variant!r}")
    ks = int(k_slices)
    if ks != k_slices or ks < 1 or ks & (ks - 1) or ks > p.HF:
        raise ValueError(f"k_slices: expected a power of two from 1 to pow2(H) = {p.HF}, got "
                         f"{k_slices!r}")
    return ks


def _persistent_tiles(G: int, B: int, H: int, size: int, mma: bool, n_co: int,
                      block_h: Optional[int], block_b: Optional[int]) -> Optional[tuple]:
    """``(BH, BB)`` of a persistent grid, or None when none fits.

    One program per (hidden slice, batch tile).  BH starts at PERSISTENT_MMA_M // G units
    (64 gate rows, the M of a warpgroup MMA) and BB at min(pow2(B), 16); then BB doubles (up
    to PERSISTENT_MAX_BB) and after it BH doubles until the grid fits the ``n_co``
    co-resident programs.  The slice W_sl^T ``[G*BH, pow2(H)]`` (held by the backward in
    every dtype, by the forward for tensor-core types) plus the h tile must fit
    PERSISTENT_MAX_SMEM bytes; BH first halves until it does, and on a GPU a slice of fewer
    than PERSISTENT_MMA_M gate rows is not taken (its forward product cannot use the
    warpgroup MMA and spills: H > 1024 in bf16 goes to ``step``).  Under the interpreter
    (``n_co`` = 1) programs run one at a time: a barrier group must be a single program
    (BH >= H), while groups are independent.
    """
    hfull = max(16, _pow2(H))
    interp = n_co == 1
    bh = block_h or (hfull if interp else max(1, min(PERSISTENT_MMA_M // G, hfull)))
    bb = block_b or min(_pow2(B), 16)

    def smem(bh_, bb_):
        return (G * bh_ + bb_) * hfull * size

    if block_h is None:
        while smem(bh, bb) > PERSISTENT_MAX_SMEM and G * bh > 16:
            bh //= 2
    while True:
        nh, nb = triton.cdiv(H, bh), triton.cdiv(B, bb)
        if smem(bh, bb) > PERSISTENT_MAX_SMEM:
            return None
        if not interp and block_h is None and G * bh < min(PERSISTENT_MMA_M, G * hfull):
            return None  # a forward product below the warpgroup MMA's M spills
        if nh <= n_co and (interp or nh * nb <= n_co):
            return bh, bb
        if block_b is None and bb < PERSISTENT_MAX_BB and bb < _pow2(B):
            bb *= 2
        elif block_h is None and bh < hfull:
            bh *= 2
        else:
            return None


def interleave_w(w_hh: torch.Tensor, G: int, units: int, width: int) -> torch.Tensor:
    """W_hh ``[G*H, H]`` with its rows in interleaved gate order (row ``u*G + g`` = row
    ``g*H + u``), zero-padded to ``[units*G, width]`` (units >= H, width >= H)."""
    GH, H = w_hh.shape
    out = w_hh.new_zeros(units * G, width)
    out[:GH, :H] = w_hh.view(G, H, H).transpose(0, 1).reshape(GH, H)
    return out


def transpose_w(w_hh: torch.Tensor, G: int, units: int, width: int) -> torch.Tensor:
    """W_hh ``[G*H, H]`` as ``[G, units, width]``: ``[g, u, k]`` = ``W[g*H + k, u]``,
    zero-padded (units >= H, width >= H): the persistent backward's column slices."""
    GH, H = w_hh.shape
    out = w_hh.new_zeros(G, units, width)
    out[:, :H, :H] = w_hh.view(G, H, H).transpose(1, 2)
    return out


def _split(v: float) -> tuple:
    """``v`` as fp32 hi + lo (the kernels rebuild it in float64 exactly enough)."""
    hi = float(np.float32(v))
    return hi, float(np.float32(v - hi))


def _tf32(spec: Spec, dtype: torch.dtype) -> bool:
    return bool(spec.allow_tf32) and dtype == torch.float32


def _persist(p: Plan) -> dict:
    """Launch options of a persistent kernel: cooperative (co-residency guaranteed, or a
    launch error instead of a hang) and no software pipelining (the pipeliner would issue
    the loads of step k+1 before the barrier of step k)."""
    opts = {"num_stages": 1}
    if p.NH > 1 and not interpreting():
        opts["launch_cooperative_grid"] = True
    return opts


def _on(device: torch.device):
    """Make ``device`` current for the launches (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _acc_tl(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _alloc(poison: bool):
    """torch.empty, or a NaN-filled empty when ``poison`` (tests: unwritten elements fail)."""
    def make(*shape, dtype, device):
        t = torch.empty(*shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if poison and t.is_floating_point() else t
    return make


def _common(spec: Spec, x_proj: torch.Tensor, lengths, ar_mask):
    T, B, _ = x_proj.shape
    lens = lengths if lengths is not None else torch.empty(1, dtype=torch.int64,
                                                            device=x_proj.device)
    mask = ar_mask if ar_mask is not None else x_proj
    flags = (T, B, int(lengths is not None), int(ar_mask is not None), int(spec.reverse),
             int(spec.ns_include_initial))
    return lens, mask, flags


def _weights(spec: Spec) -> tuple:
    return (*_split(spec.w_ns), *_split(spec.w_tar), *_split(spec.w_ar))


def _cell_scale(spec: Spec, cell_scale: Optional[torch.Tensor], H: int, acc: torch.dtype,
                device: torch.device) -> Optional[torch.Tensor]:
    """The normprop cell scale as the kernels read it (``[H]``, ACC, contiguous), or None."""
    if spec.cell != "normprop":
        if cell_scale is not None:
            raise ValueError(f"cell_scale: only the 'normprop' cell takes one; got a tensor "
                             f"for cell {spec.cell!r}")
        return None
    if cell_scale is None:
        raise ValueError("cell_scale: the 'normprop' cell needs a [H] tensor (gamma_c / "
                         "sigma_c), got None")
    if tuple(cell_scale.shape) != (H,):
        raise ValueError(f"cell_scale: expected shape [{H}] (H), got "
                         f"{list(cell_scale.shape)}")
    return cell_scale.to(device=device, dtype=acc).contiguous()


def _acc_input(t: Optional[torch.Tensor], name: str, shape: tuple, acc: torch.dtype,
               device: torch.device) -> Optional[torch.Tensor]:
    """An optional ``[T+1, B]`` upstream gradient as the kernels read it (ACC), or None."""
    if t is None:
        return None
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)} ([T+1, B]), got "
                         f"{list(t.shape)}")
    return t.to(device=device, dtype=acc).contiguous()


def forward(spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
            c0: Optional[torch.Tensor], ar_mask: Optional[torch.Tensor],
            lengths: Optional[torch.Tensor], cell_scale: Optional[torch.Tensor] = None, *,
            variant: Optional[str] = None, block_h: Optional[int] = None,
            block_b: Optional[int] = None, poison: bool = False):
    """Forward of the contract (``rnnreg_kernels.contract``, v2) with the Triton kernels.

    Returns ``(output [T, B, H], h_n [B, H], c_n [B, H] or None, terms [3], norms [T+1, B],
    cell_norms [T+1, B] or None, saved)`` with ``saved = (act [T, B, 4H], cs [T, B, H])``
    (activated gates and c, ACC dtype) for the LSTM-type cells and ``()`` otherwise;
    ``cell_norms`` (ACC) when ``spec.cell_norms``.  ``cell_scale [H]`` is normprop's
    per-unit scale a (required for normprop, None otherwise).  ``variant`` / ``block_h`` /
    ``block_b`` force the plan (see :func:`plan`; tests); ``poison`` NaN-fills every buffer
    before the launch.
    """
    T, B, GH = x_proj.shape
    H = w_hh.shape[1]
    G = spec.gates
    dtype, dev = x_proj.dtype, x_proj.device
    acc = acc_dtype_of(dtype)
    lstm = spec.has_cell_state
    if spec.cell_norms and not lstm:
        raise ValueError(f"spec.cell_norms: only the cells with a cell state ("
                         f"{', '.join(LSTM_CELLS)}) have cell norms; got cell {spec.cell!r}")
    scale = _cell_scale(spec, cell_scale, H, acc, dev)
    p = with_features(forward_plan(plan(spec.cell, B, H, dtype, dev, _tf32(spec, dtype),
                                        variant, block_h, block_b)),
                      cell_norms=spec.cell_norms)
    new = _alloc(poison)
    out = new(T, B, H, dtype=dtype, device=dev)
    h_n = new(B, H, dtype=dtype, device=dev)
    c_n = new(B, H, dtype=dtype, device=dev) if lstm else None
    norms = new(T + 1, B, dtype=acc, device=dev)
    cnorms = new(T + 1, B, dtype=acc, device=dev) if spec.cell_norms else None
    act = new(T, B, GH, dtype=acc, device=dev) if lstm else norms
    cs = new(T, B, H, dtype=acc, device=dev) if lstm else norms
    lens, mask, flags = _common(spec, x_proj, lengths, ar_mask)
    ptrs = (x_proj, w_hh, h0, c0 if lstm else h0, lens, mask,
            scale if scale is not None else norms, out, h_n, c_n if lstm else h_n, act, cs,
            norms, cnorms if cnorms is not None else norms)
    scal = (*flags[:2], H, *flags[2:], *_split(spec.theta), *_split(spec.h_scale),
            H * spec.ns_eps, *_weights(spec))
    meta = dict(CELL=CELL_CODE[spec.cell], G=G, BB=p.BB, BH=p.BH, ACC=_acc_tl(acc),
                ACC_F64=acc == torch.float64, TF32=_tf32(spec, dtype),
                CELL_NORMS=p.cell_norms, num_warps=p.num_warps)
    with _on(dev):
        if p.variant == "tiled":
            tpart = new(p.NB, 3, dtype=acc, device=dev)
            _fwd.fwd_tiled[(p.NB,)](*ptrs, tpart, *scal, **meta)
        elif p.variant == "persistent":
            tpart = new(p.NB * p.NH, 3, dtype=acc, device=dev)
            hbuf = torch.zeros(2, B, p.HF, dtype=dtype, device=dev)
            bar = torch.zeros(p.NB, dtype=torch.int32, device=dev)
            wt = interleave_w(w_hh, G, p.NH * p.BH, p.HF)
            _fwd.fwd_persistent[(p.NH, p.NB)](ptrs[0], wt, *ptrs[2:], tpart, hbuf, bar,
                                              *scal, BK=p.BK, HF=p.HF, NR=p.NR,
                                              HOLD=p.hold, KH=p.KH, **meta,
                                              **_persist(p))
        else:
            tpart = torch.zeros(p.NB * p.NH, 3, dtype=acc, device=dev)
            part = new(2, p.NH, B, dtype=acc, device=dev)
            cpart = new(2, p.NH, B, dtype=acc, device=dev) if spec.cell_norms else part
            grid = (p.NH, p.NB)
            for k in range(T + 2):
                _fwd.fwd_step_launch[grid](*ptrs, tpart, part, cpart, k, *scal, BK=p.BK,
                                           NP=p.NP, **meta)
    terms = tpart.sum(0)
    saved = (act, cs) if lstm else ()
    return out, h_n, c_n, terms, norms, cnorms, saved


def backward(spec: Spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms,
             cell_norms, saved, grad_output, grad_h_n, grad_c_n, grad_terms,
             grad_norms=None, grad_cell_norms=None, *, variant: Optional[str] = None,
             block_h: Optional[int] = None, block_b: Optional[int] = None,
             k_slices: Optional[int] = None, poison: bool = False):
    """Backward of the contract (v2): ``(grad_x_proj, grad_w_hh, grad_h0, grad_c0 or None,
    grad_cell_scale [H] (ACC) or None)``.

    The kernels produce grad_x_proj (dz), grad_h0, grad_c0 and per-batch-tile partial sums
    of grad_cell_scale (summed here); grad_w_hh is one GEMM ``dZ^T @ H_prev`` here.
    ``grad_norms`` / ``grad_cell_norms`` ``[T+1, B]`` (or None: zero) enter the kernels as
    the radial terms; ``grad_cell_norms`` needs the forward's ``cell_norms``.  Keywords as
    in :func:`forward` (use the same plan); ``k_slices`` forces the K-slices of the
    persistent backward's product (``Plan.KS``; tests: the interpreter's single-program
    plans have 64 or more units and take KS = 1).
    """
    T, B, GH = output.shape[0], output.shape[1], w_hh.shape[0]
    H = w_hh.shape[1]
    G = spec.gates
    dtype, dev = output.dtype, output.device
    acc = acc_dtype_of(dtype)
    lstm = spec.has_cell_state
    scale = _cell_scale(spec, cell_scale, H, acc, dev)
    gnorms = _acc_input(grad_norms, "grad_norms", (T + 1, B), acc, dev)
    gcnorms = _acc_input(grad_cell_norms, "grad_cell_norms", (T + 1, B), acc, dev)
    if gcnorms is not None and cell_norms is None:
        raise ValueError("grad_cell_norms: given, but cell_norms is None (the forward "
                         "computes cell norms only with spec.cell_norms)")
    p = with_features(plan(spec.cell, B, H, dtype, dev, _tf32(spec, dtype), variant, block_h,
                           block_b), grad_norms=gnorms is not None,
                      grad_cell_norms=gcnorms is not None)
    if k_slices is not None:
        p = dataclasses.replace(p, KS=_check_k_slices(k_slices, p))
    new = _alloc(poison)
    gx = new(T, B, GH, dtype=dtype, device=dev)
    gh0 = new(B, H, dtype=dtype, device=dev)
    gc0 = new(B, H, dtype=dtype, device=dev) if lstm else None
    gscale = None
    if scale is not None:
        gscale = (torch.zeros if p.variant == "step" else new)(p.NB, H, dtype=acc, device=dev)
    act, cs = saved if lstm else (norms, norms)
    lens, mask, flags = _common(spec, output, lengths, ar_mask)
    gterms = grad_terms.to(acc).contiguous()

    def _or(t):
        return t if t is not None else norms

    ptrs = (output, w_hh, h0, c0 if lstm else h0, lens, mask, _or(scale), act, cs, norms,
            _or(cell_norms.to(acc).contiguous() if gcnorms is not None else None),
            grad_output, grad_h_n, grad_c_n if lstm else grad_h_n, gterms, _or(gnorms),
            _or(gcnorms), gx, gh0, gc0 if lstm else gh0, _or(gscale))
    scal = (*flags[:2], H, *flags[2:], *_split(spec.h_scale), *_weights(spec))
    meta = dict(CELL=CELL_CODE[spec.cell], G=G, BB=p.BB, BH=p.BH, ACC=_acc_tl(acc),
                ACC_F64=acc == torch.float64, TF32=_tf32(spec, dtype),
                GRAD_NORMS=p.grad_norms, GRAD_CELL_NORMS=p.grad_cell_norms,
                num_warps=p.num_warps)
    with _on(dev):
        if p.variant == "tiled":
            _bwd.bwd_tiled[(p.NB,)](*ptrs, *scal, **meta)
        else:
            dc = new(B, H, dtype=acc, device=dev) if lstm else norms
            if p.variant == "persistent":
                bar = torch.zeros(p.NB, dtype=torch.int32, device=dev)
                dzbuf = torch.zeros(2, B, G * p.HF, dtype=dtype, device=dev)
                wb = transpose_w(w_hh, G, p.NH * p.BH, p.HF)
                _bwd.bwd_persistent[(p.NH, p.NB)](ptrs[0], wb, *ptrs[2:], dzbuf, bar, *scal,
                                                  HF=p.HF, KS=p.KS, **meta, **_persist(p))
            else:
                grid = (p.NH, p.NB)
                for k in range(T, -1, -1):
                    _bwd.bwd_step_launch[grid](*ptrs, dc, k, *scal, BK=p.BK, **meta)
    gw = grad_w_hh(gx, output, h0, lengths, spec.reverse)
    gcs = gscale.sum(0) if gscale is not None else None
    return gx, gw, gh0, gc0, gcs


def grad_w_hh(gx: torch.Tensor, output: torch.Tensor, h0: torch.Tensor,
              lengths: Optional[torch.Tensor], reverse: bool) -> torch.Tensor:
    """``dZ^T @ H_prev`` ``[G*H, H]`` without materializing H_prev.

    Position p of row b was step k; its previous state is ``output[p -/+ 1]`` or h0 for the
    row's first step.  dZ is zero at invalid positions and ``output`` is zero there too, so
    the shifted product is exact; the first steps add ``dZ_first^T @ h0``.
    """
    T, B, GH = gx.shape
    H = output.shape[2]
    if not reverse:
        gw = gx[1:].reshape(-1, GH).t() @ output[:-1].reshape(-1, H)
        first = gx[0]
    else:
        gw = gx[:-1].reshape(-1, GH).t() @ output[1:].reshape(-1, H)
        if lengths is None:
            first = gx[T - 1]
        else:
            first = gx[lengths - 1, torch.arange(B, device=gx.device)]
    return gw.addmm_(first.t(), h0)

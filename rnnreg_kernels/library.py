"""The backends' forward and backward as ``torch.library`` custom ops (no autograd here).

``rnnreg::recurrence_fwd`` and ``rnnreg::recurrence_bwd`` run one backend's contract
``forward`` / ``backward`` (:mod:`rnnreg_kernels.contract`) behind the dispatcher, so that
TorchDynamo treats them as single opaque ops: ``torch.compile(..., fullgraph=True)`` of a model
holding the modules traces no Python time loop and no kernel launch, and the graph does not
depend on the sequence length.  Their fake (meta) implementations give the output shapes from
the input shapes alone; they know each backend's ``saved`` layout (below, or a backend
module's own ``fake_saved``).

Both ops take the *raw* penalty coefficients and build the :class:`~rnnreg_kernels.contract.Spec`
inside (dividing by counts that depend on T), so no value that varies with the sequence length
becomes a graph constant.  Autograd lives in :mod:`rnnreg_kernels.ops` (``_Recurrence``).

Outputs follow the op contract with two encodings, since a custom op returns only tensors
that alias nothing: a None (``c_n`` of a plain RNN, a backend's unused saved slot) is a 1-D
empty tensor, and a saved tensor that is also an output is returned as a copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .contract import Spec, acc_dtype_of, gates_of, has_cell_state
from .penalties import Penalties, penalty_weights


@dataclass(frozen=True)
class RawSpec:
    """What a call fixes besides its tensors: hashable, constant for a model."""

    backend: str
    cell: str
    theta: float
    norm_stabilizer: float
    tar: float
    ar: float
    ns_include_initial: bool
    ns_eps: float
    reverse: bool
    allow_tf32: bool
    h_scale: float = 1.0
    cell_norms: bool = False

    def args(self) -> tuple:
        return (self.backend, self.cell, self.theta, self.norm_stabilizer, self.tar, self.ar,
                self.ns_include_initial, self.ns_eps, self.reverse, self.allow_tf32,
                self.h_scale, self.cell_norms)


def make_spec(cell: str, theta: float, ns: float, tar: float, ar: float, ns_initial: bool,
              ns_eps: float, reverse: bool, tf32: bool, T: int, B: int, H: int,
              lengths: Optional[torch.Tensor], h_scale: float = 1.0,
              cell_norms: bool = False) -> Spec:
    """The backend :class:`Spec` of a call (coefficients divided by the counts)."""
    pen = Penalties(norm_stabilizer=ns, tar=tar, ar=ar, ns_include_initial=ns_initial,
                    ns_eps=ns_eps)
    w = penalty_weights(pen, T, B, H, lengths)
    return Spec(cell=cell, theta=theta, w_ns=w.ns, w_tar=w.tar, w_ar=w.ar,
                ns_include_initial=ns_initial, ns_eps=ns_eps, reverse=reverse,
                allow_tf32=tf32, h_scale=float(h_scale), cell_norms=bool(cell_norms))


def _module(name: str):
    from .ops import backend_module
    return backend_module(name)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _decode(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None or (t.dim() == 1 and t.numel() == 0) else t


def _dealias(outs: list, inputs: list) -> list:
    """Copy any output that shares storage with an input or an earlier output."""
    seen = [t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()]
    res = []
    for t in outs:
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.append(ptr)
        res.append(t)
    return res


@torch.library.custom_op("rnnreg::recurrence_fwd", mutates_args=())
def recurrence_fwd(x_proj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
                   c0: Optional[torch.Tensor], ar_mask: Optional[torch.Tensor],
                   lengths: Optional[torch.Tensor], cell_scale: Optional[torch.Tensor],
                   backend: str, cell: str, theta: float, ns: float, tar: float, ar: float,
                   ns_initial: bool, ns_eps: float, reverse: bool, tf32: bool, h_scale: float,
                   with_cell_norms: bool) -> List[torch.Tensor]:
    """``[output, h_n, c_n, terms, norms, cell_norms, *saved]`` of backend ``backend``
    (encoded)."""
    T, B, _ = x_proj.shape
    spec = make_spec(cell, theta, ns, tar, ar, ns_initial, ns_eps, reverse, tf32, T, B,
                     w_hh.shape[1], lengths, h_scale, with_cell_norms)
    output, h_n, c_n, terms, norms, cell_norms, saved = _module(backend).forward(
        spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale)
    outs = [output, h_n, _empty(h_n) if c_n is None else c_n, terms, norms,
            _empty(norms) if cell_norms is None else cell_norms]
    outs += [_empty(h_n) if t is None else t for t in saved]
    return _dealias(outs, [x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale])


def _saved_layout(backend: str, cell: str, dtype: torch.dtype, T, B, H) -> list:
    """``[(shape, dtype) or None]``: what ``backend``'s forward saves, from shapes alone."""
    acc = acc_dtype_of(dtype)
    lstm = has_cell_state(cell)
    GH = gates_of(cell) * H
    if backend == "reference":
        return [((T, B, H), acc), ((T, B, GH), acc) if lstm else None,
                ((T, B, H), acc) if lstm else None]
    if backend == "triton":
        return [((T, B, GH), acc), ((T, B, H), acc)] if lstm else []
    if backend == "cuda":
        return [((T, B, H), torch.float32) if dtype != torch.float32 else None,
                ((T, B, GH), torch.float32) if lstm else None,
                ((T, B, H), torch.float32) if lstm else None]
    mod = _module(backend)
    if not hasattr(mod, "fake_saved"):
        raise NotImplementedError(
            f"backend {backend!r} cannot run under torch.compile: its module declares no "
            f"fake_saved(cell, dtype, T, B, H) for rnnreg::recurrence_fwd's fake impl")
    return mod.fake_saved(cell, dtype, T, B, H)


@recurrence_fwd.register_fake
def _(x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, backend, cell, theta, ns, tar, ar,
      ns_initial, ns_eps, reverse, tf32, h_scale, with_cell_norms):
    T, B, _ = x_proj.shape
    H = w_hh.shape[1]
    acc = acc_dtype_of(x_proj.dtype)
    lstm = has_cell_state(cell)
    out = [x_proj.new_empty(T, B, H), h0.new_empty(B, H),
           h0.new_empty(B, H) if lstm else h0.new_empty(0),
           x_proj.new_empty(3, dtype=acc), x_proj.new_empty(T + 1, B, dtype=acc),
           x_proj.new_empty(T + 1, B, dtype=acc) if lstm and with_cell_norms
           else x_proj.new_empty(0, dtype=acc)]
    for slot in _saved_layout(backend, cell, x_proj.dtype, T, B, H):
        out.append(h0.new_empty(0) if slot is None else x_proj.new_empty(*slot[0],
                                                                         dtype=slot[1]))
    return out


@torch.library.custom_op("rnnreg::recurrence_bwd", mutates_args=())
def recurrence_bwd(x_proj: Optional[torch.Tensor], w_hh: torch.Tensor, h0: torch.Tensor,
                   c0: Optional[torch.Tensor], ar_mask: Optional[torch.Tensor],
                   lengths: Optional[torch.Tensor], cell_scale: Optional[torch.Tensor],
                   output: torch.Tensor, norms: torch.Tensor,
                   cell_norms: Optional[torch.Tensor], saved: List[torch.Tensor],
                   g_out: torch.Tensor, g_hn: torch.Tensor, g_cn: Optional[torch.Tensor],
                   g_terms: torch.Tensor, g_norms: Optional[torch.Tensor],
                   g_cell_norms: Optional[torch.Tensor], backend: str, cell: str,
                   theta: float, ns: float, tar: float, ar: float, ns_initial: bool,
                   ns_eps: float, reverse: bool, tf32: bool, h_scale: float,
                   with_cell_norms: bool) -> List[torch.Tensor]:
    """``[grad_x_proj, grad_w_hh, grad_h0, grad_c0, grad_cell_scale]`` of backend
    ``backend`` (encoded)."""
    T, B, H = output.shape
    spec = make_spec(cell, theta, ns, tar, ar, ns_initial, ns_eps, reverse, tf32, T, B, H,
                     lengths, h_scale, with_cell_norms)
    mod = _module(backend)
    dec = tuple(_decode(t) for t in saved)
    gx, gw, gh0, gc0, gcs = mod.backward(
        spec, x_proj if getattr(mod, "SAVE_X_PROJ", False) else None, w_hh, h0, c0, ar_mask,
        lengths, cell_scale, output, norms, _decode(cell_norms), dec, g_out, g_hn, g_cn,
        g_terms, g_norms, g_cell_norms)
    outs = [gx, gw, gh0, _empty(gh0) if gc0 is None else gc0,
            _empty(norms) if gcs is None else gcs]
    return _dealias(outs, [x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms,
                           cell_norms, *saved, g_out, g_hn, g_cn, g_terms, g_norms,
                           g_cell_norms])


@recurrence_bwd.register_fake
def _(x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms, cell_norms, saved,
      g_out, g_hn, g_cn, g_terms, g_norms, g_cell_norms, backend, cell, theta, ns, tar, ar,
      ns_initial, ns_eps, reverse, tf32, h_scale, with_cell_norms):
    T, B, H = output.shape
    acc = acc_dtype_of(output.dtype)
    return [output.new_empty(T, B, w_hh.shape[0]), torch.empty_like(w_hh),
            torch.empty_like(h0),
            torch.empty_like(h0) if has_cell_state(cell) else h0.new_empty(0),
            norms.new_empty(H, dtype=acc) if cell == "normprop" else norms.new_empty(0)]

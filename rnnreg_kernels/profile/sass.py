"""SASS analysis shared by both backends of the static profile (no GPU needed).

Pipeline: a cubin -> ``nvdisasm -g`` text (:func:`disassemble`) -> instructions
(:func:`parse_function`: predicate, opcode with modifiers, operands, source line) -> basic
blocks and natural loops from the branch targets (:class:`Function`) -> per-step counts of the
kernel's time loop (:func:`analyze`).

Counting rules (also written into the profile's JSON, see :data:`COUNTING`):

* The *time loop* is the loop over the recurrence steps: the outermost loop that contains a
  grid barrier (a spin loop, see below) in persistent kernels; otherwise the outermost loop
  that contains tensor-core ops, FMAs or global stores.  ``time_loop=None`` (kernels launched
  once per step) makes the whole kernel one step.
* A *spin loop* is a small loop that polls memory (an atomic, or a strong/volatile load, or
  NANOSLEEP) and does no math and no stores: a barrier wait.  It counts once per step (the
  poll that sees the barrier open).
* Every other loop nested in the time loop is weighted by its trip count, which the backend
  supplies (``trip_of(loop) -> (trips, how)``); a loop whose trip count is unknown counts once
  and is listed under ``unweighted_loops``.
* Every instruction of the time loop is counted, on every path (branches inside the step are
  not resolved): the counts are an upper bound of the instructions a warp issues per step.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

TENSOR_CORE = frozenset({"HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "BGMMA", "QMMA",
                         "QGMMA", "OMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA"})
FMA = frozenset({"FFMA", "FFMA2", "FFMA32I", "HFMA2", "HFMA2_32I", "DFMA"})
GLOBAL_LOADS = frozenset({"LDG", "LD", "LDGSTS"})
GLOBAL_STORES = frozenset({"STG", "ST"})
ATOMICS = frozenset({"ATOMG", "ATOM", "RED", "REDG"})
SHARED_LOADS = frozenset({"LDS", "LDSM"})
BRANCHES = frozenset({"BRA", "BRX", "JMP", "JMX"})
ENDS = frozenset({"EXIT", "RET", "KILL"})
WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16}

COUNTING = {
    "time_loop": "the loop over the recurrence steps: the outermost loop containing a grid "
                 "barrier (a spin loop) in persistent kernels, else the outermost loop "
                 "containing tensor-core ops, FMAs or global stores; kernels launched once per "
                 "step count the whole kernel as one step",
    "spin_loops": "a small loop polling memory (atomic, strong/volatile load or NANOSLEEP) "
                  "without math or stores: a barrier wait, counted once per step",
    "inner_loops": "every other loop inside the time loop is weighted by its trip count "
                   "(from the plan, see each kernel's `loops`); unknown trip counts count "
                   "once and are listed in `unweighted_loops`",
    "paths": "all instructions of the step are counted on every path (branches inside the "
             "step are not resolved): an upper bound of what a warp issues",
    "per_warp": "SASS instructions are issued once per warp, so the counts are per warp",
    "global_load_bytes_per_step": "per program: sum over global loads (LDG, LD, LDGSTS) of "
                                  "width in bytes x 32 lanes x warps of the program x weight; "
                                  "masked-off lanes are counted as loading",
    "dependent_chain": "longest chain of tensor-core ops per step through register "
                       "dependences (any operand), all registers ready at the step's start; "
                       "inner loops are extrapolated from two simulated iterations",
    "exchange_round_trips": "per segment between grid barriers: the longest chain of global "
                            "loads (LDG/LD) whose results feed each other through registers; "
                            "summed over the step's segments; async copies (LDGSTS) are "
                            "prefetches and not counted; kernels without a grid barrier have "
                            "none (their state stays on chip)",
}

_INSN = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+|[A-Za-z_$][\w$.]*):\s*$")
_LINE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_PRED = re.compile(r"^@(!?U?P(?:T|\d+))\s+")
_TARGET = re.compile(r"`\(([^)]+)\)")
_REG = re.compile(r"\b(U?R(?:\d+|Z)|U?P(?:\d+|T))\b")
_FUNC = re.compile(r"^\s*\.text\.(\S+):\s*$")


# ----------------------------------------------------------------------------- tools

def tool(name: str) -> str:
    """Path of ``nvdisasm`` / ``cuobjdump``: the Triton wheel's (knobs, then its bin folder),
    then ``$CUDA_HOME/bin``, then PATH.  Raises ``FileNotFoundError`` naming what was tried."""
    tried = []
    try:
        import triton
        knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
        knob = getattr(knobs, name, None) if knobs is not None else None
        path = getattr(knob, "path", None) if knob is not None else None
        if path and os.path.exists(path):
            return path
        tried.append(f"triton.knobs.nvidia.{name}")
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(cand):
            return cand
        tried.append(cand)
    except ImportError:
        tried.append("triton (not importable)")
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", name)
    if os.path.exists(cand):
        return cand
    tried.append(cand)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found (tried {', '.join(tried)} and PATH)")


def _run_on_cubin(args: Sequence[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([*args, f.name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(args[0])} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -g`` text of a cubin (with source line information)."""
    return _run_on_cubin([tool("nvdisasm"), "-g", "-c"], cubin)


def resources(cubin: bytes) -> Dict[str, Dict[str, int]]:
    """Per function: ``{"registers", "stack", "local", "shared"}`` from ``cuobjdump -res-usage``
    (``shared`` is the static shared memory; dynamic shared memory is the launcher's)."""
    text = _run_on_cubin([tool("cuobjdump"), "-res-usage"], cubin)
    out, fn = {}, None
    for line in text.splitlines():
        m = re.search(r"Function ([^\s:]+):", line)
        if m:
            fn = m.group(1)
            continue
        if "REG:" in line and fn is not None:
            fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            out[fn] = {"registers": int(fields.get("REG", 0)),
                       "stack": int(fields.get("STACK", 0)),
                       "local": int(fields.get("LOCAL", 0)),
                       "shared": int(fields.get("SHARED", 0))}
            fn = None
    return out


# ----------------------------------------------------------------------------- parsing

@dataclasses.dataclass
class Insn:
    addr: int
    text: str
    pred: Optional[str]
    opcode: str                 # with modifiers, e.g. "LDG.E.128"
    operands: List[str]
    file: Optional[str] = None
    line: Optional[int] = None

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def mods(self) -> List[str]:
        return self.opcode.split(".")[1:]

    @property
    def target(self) -> Optional[str]:
        for op in self.operands:
            m = _TARGET.search(op)
            if m:
                return m.group(1)
        return None

    @property
    def unconditional(self) -> bool:
        return self.pred is None or self.pred == "PT"

    def width(self) -> int:
        """Bytes per lane of a load/store (4 unless a width modifier says otherwise)."""
        for mod in reversed(self.mods):
            if mod in WIDTH:
                return WIDTH[mod]
        return 4

    def _mma_shape(self) -> Tuple[int, int, int]:
        """(A, B, C/D) registers per thread of a tensor-core op (0: unknown)."""
        mods = self.mods
        f32 = any(m in ("F32", "S32") for m in mods)
        if self.base in ("HGMMA", "IGMMA", "QGMMA", "BGMMA"):
            for m in mods:
                mm = re.match(r"64x(\d+)x\d+", m)
                if mm:
                    n = int(mm.group(1))
                    return 4, 0, n // 2 if f32 else n // 4
            return 0, 0, 0
        if self.base == "DMMA":
            return 2, 1, 2
        if "16816" in mods or "16832" in mods:
            return 4, 2, 4 if f32 else 2
        if "1688" in mods or "16816" not in mods:
            return 2, 1, 4 if f32 else 2
        return 0, 0, 0

    def _dest_count(self) -> int:
        if self.base in TENSOR_CORE:
            return max(1, self._mma_shape()[2])
        if self.base == "LDSM":
            return _ldsm_count(self)
        if self.base in ("LDG", "LD", "LDS", "LDL", "LDC", "ULDC", "ATOMG", "ATOM"):
            return max(1, self.width() // 4)
        if "WIDE" in self.mods or self.base in ("DADD", "DMUL", "DFMA", "DMNMX"):
            return 2
        if self.base == "CS2R" and "32" not in self.mods:
            return 2
        return 1

    def regs_written(self) -> List[str]:
        if not self.operands or self.base in BRANCHES | ENDS | GLOBAL_STORES | {
                "STS", "STL", "RED", "REDG", "BAR", "LDGSTS", "BSSY", "BSYNC", "WARPSYNC",
                "DEPBAR", "MEMBAR", "NOP", "CALL", "YIELD", "NANOSLEEP", "LDGDEPBAR",
                "ERRBAR", "CCTL", "FENCE", "ARRIVES", "SYNCS"}:
            return []
        first = self.operands[0]
        if first.startswith("[") or "desc[" in first:
            return []
        regs = []
        for r in _REG.findall(first):
            if r in ("RZ", "URZ", "PT", "UPT"):
                continue
            regs += _span(r, self._dest_count() if r[0] in "RU" and "P" not in r else 1)
        # SETP-style: two predicate destinations (P0, P1, ...) before the sources
        if self.base.endswith("SETP") and len(self.operands) > 1:
            regs += [r for r in _REG.findall(self.operands[1]) if r.startswith(("P", "UP"))
                     and r not in ("PT", "UPT")]
        return regs

    def regs_read(self) -> List[str]:
        writes = bool(self.regs_written())
        ops = self.operands[1:] if writes else self.operands
        if self.base.endswith("SETP") and len(self.operands) > 1:
            ops = self.operands[2:]
        spans = [1] * len(ops)
        if self.base in TENSOR_CORE and writes:
            a, b, c = self._mma_shape()
            spans = [a or 1, b or 1, c or 1] + [1] * max(0, len(ops) - 3)
        regs = []
        for op, n in zip(ops, spans):
            for r in _REG.findall(op):
                if r in ("RZ", "URZ", "PT", "UPT"):
                    continue
                k = 2 if (r + ".64") in op else n
                regs += _span(r, k) if r[0] in "RU" and "P" not in r else [r]
        if self.pred:
            regs.append(self.pred.lstrip("!"))
        return regs


def _span(reg: str, n: int) -> List[str]:
    """``reg`` and the n-1 registers after it (R52, 4 -> R52..R55)."""
    m = re.match(r"(U?R)(\d+)$", reg)
    if not m or n <= 1:
        return [reg]
    return [f"{m.group(1)}{int(m.group(2)) + i}" for i in range(n)]


def _ldsm_count(i: "Insn") -> int:
    for m in i.mods:
        if m in ("2", "4"):
            return int(m)
    return 1


def _split_operands(text: str) -> List[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_insn(addr: int, body: str) -> Insn:
    pred = None
    m = _PRED.match(body)
    if m:
        pred = m.group(1)
        body = body[m.end():]
    parts = body.split(None, 1)
    opcode = parts[0] if parts else ""
    operands = _split_operands(parts[1]) if len(parts) > 1 else []
    return Insn(addr, body, pred, opcode, operands)


def split_functions(text: str) -> Dict[str, List[Tuple[str, object]]]:
    """``{function: [("label", name) | ("insn", Insn)]}`` from nvdisasm text."""
    funcs: Dict[str, List[Tuple[str, object]]] = {}
    cur: Optional[List] = None
    src = (None, None)
    for raw in text.splitlines():
        m = _FUNC.match(raw)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            src = (None, None)
            continue
        if cur is None:
            continue
        m = _LINE.match(raw)
        if m:
            src = (m.group(1), int(m.group(2)))
            continue
        m = _INSN.match(raw)
        if m:
            ins = parse_insn(int(m.group(1), 16), m.group(2))
            ins.file, ins.line = src
            cur.append(("insn", ins))
            continue
        m = _LABEL.match(raw)
        if m:
            cur.append(("label", m.group(1)))
    return funcs


# ----------------------------------------------------------------------------- CFG, loops

@dataclasses.dataclass
class Block:
    index: int
    insns: List[Insn]
    succ: List[int] = dataclasses.field(default_factory=list)
    pred: List[int] = dataclasses.field(default_factory=list)

    @property
    def start(self) -> int:
        return self.insns[0].addr


@dataclasses.dataclass
class Loop:
    header: int                       # block index
    blocks: frozenset
    latches: Tuple[int, ...]
    parent: Optional["Loop"] = None
    children: List["Loop"] = dataclasses.field(default_factory=list)
    spin: bool = False
    irreducible: bool = False

    def own_blocks(self) -> List[int]:
        inner = set()
        for c in self.children:
            inner |= c.blocks
        return sorted(self.blocks - inner)

    @property
    def depth(self) -> int:
        d, p = 0, self.parent
        while p is not None:
            d, p = d + 1, p.parent
        return d


class Function:
    """Basic blocks, dominators and natural loops of one SASS function."""

    def __init__(self, name: str, items: List[Tuple[str, object]]):
        self.name = name
        insns = [it[1] for it in items if it[0] == "insn"]
        label_at: Dict[str, int] = {}
        pending: List[str] = []
        for kind, val in items:
            if kind == "label":
                pending.append(val)
            else:
                for lab in pending:
                    label_at[lab] = val.addr
                pending = []
        self.insns = insns
        leaders = {insns[0].addr} if insns else set()
        for i, ins in enumerate(insns):
            if ins.base in BRANCHES and ins.target in label_at:
                leaders.add(label_at[ins.target])
            if ins.base in BRANCHES | ENDS and i + 1 < len(insns):
                leaders.add(insns[i + 1].addr)
        self.blocks: List[Block] = []
        by_addr: Dict[int, int] = {}
        for ins in insns:
            if ins.addr in leaders or not self.blocks:
                by_addr[ins.addr] = len(self.blocks)
                self.blocks.append(Block(len(self.blocks), []))
            self.blocks[-1].insns.append(ins)
        for b in self.blocks:
            last = b.insns[-1]
            nxt = b.index + 1 if b.index + 1 < len(self.blocks) else None
            if last.base in BRANCHES:
                tgt = label_at.get(last.target) if last.target else None
                if tgt is not None:
                    b.succ.append(by_addr[tgt])
                if not last.unconditional and nxt is not None:
                    b.succ.append(nxt)
            elif last.base in ENDS:
                if not last.unconditional and nxt is not None:
                    b.succ.append(nxt)
            elif nxt is not None:
                b.succ.append(nxt)
            b.succ = list(dict.fromkeys(b.succ))
        for b in self.blocks:
            for s in b.succ:
                self.blocks[s].pred.append(b.index)
        self._reachable()
        self._loops()

    def _reachable(self) -> None:
        reach, stack = set(), [0] if self.blocks else []
        while stack:
            v = stack.pop()
            if v in reach:
                continue
            reach.add(v)
            stack.extend(self.blocks[v].succ)
        self.reachable = reach

    def _sccs(self, nodes: set) -> List[set]:
        """Strongly connected components of the CFG restricted to ``nodes`` (iterative
        Tarjan)."""
        index, low, on, stack, out = {}, {}, set(), [], []
        counter = [0]
        for root in sorted(nodes):
            if root in index:
                continue
            work = [(root, iter([s for s in self.blocks[root].succ if s in nodes]))]
            index[root] = low[root] = counter[0]
            counter[0] += 1
            stack.append(root)
            on.add(root)
            while work:
                v, it = work[-1]
                advanced = False
                for w in it:
                    if w not in index:
                        index[w] = low[w] = counter[0]
                        counter[0] += 1
                        stack.append(w)
                        on.add(w)
                        work.append((w, iter([s for s in self.blocks[w].succ if s in nodes])))
                        advanced = True
                        break
                    if w in on:
                        low[v] = min(low[v], index[w])
                if advanced:
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    out.append(comp)
        return out

    def _find(self, nodes: set, parent: Optional[Loop], out: List[Loop]) -> List[Loop]:
        found = []
        for comp in self._sccs(nodes):
            if len(comp) == 1:
                v = next(iter(comp))
                if v not in self.blocks[v].succ:
                    continue
            entries = [v for v in comp if v == 0 or any(
                p not in comp for p in self.blocks[v].pred if p in self.reachable)]
            header = min(entries or comp, key=lambda v: self.blocks[v].start)
            latches = tuple(sorted(v for v in comp if header in self.blocks[v].succ))
            lp = Loop(header, frozenset(comp), latches, parent=parent,
                      irreducible=len(entries) > 1)
            out.append(lp)
            lp.children = self._find(comp - set(entries or [header]), lp, out)
            found.append(lp)
        return sorted(found, key=lambda lp: min(lp.blocks))

    def _loops(self) -> None:
        """The loop nesting forest: every strongly connected region is a loop; its header is
        its entry (the lowest-addressed one when several: irreducible); the loops inside are
        the regions left when the header is removed."""
        loops: List[Loop] = []
        self._find(set(self.reachable), None, loops)
        for lp in sorted(loops, key=lambda lp: len(lp.blocks)):
            lp.spin = self._is_spin(lp)
        self.loops = loops

    def loop_insns(self, loop: Loop, own: bool = False) -> List[Insn]:
        ids = loop.own_blocks() if own else sorted(loop.blocks)
        return [ins for b in ids for ins in self.blocks[b].insns]

    def _is_spin(self, loop: Loop) -> bool:
        if loop.children:
            return False
        ins = self.loop_insns(loop)
        bases = {i.base for i in ins}
        polls = any(i.base in ATOMICS or i.base == "NANOSLEEP" or
                    (i.base in ("LDG", "LD") and any(m in ("STRONG", "VOLATILE", "MMIO")
                                                      for m in i.mods))
                    for i in ins)
        work = bases & (TENSOR_CORE | FMA | GLOBAL_STORES | {"LDGSTS"})
        return polls and not work and len(ins) <= 48

    def top_loops(self) -> List[Loop]:
        return [lp for lp in self.loops if lp.parent is None]

    def contains(self, loop: Loop, pred: Callable[[Insn], bool]) -> bool:
        return any(pred(i) for i in self.loop_insns(loop))


def parse_function(text: str, name: Optional[str] = None) -> Function:
    funcs = split_functions(text)
    if not funcs:
        raise ValueError("no function found in the SASS text")
    if name is None:
        if len(funcs) != 1:
            raise ValueError(f"several functions in the SASS text ({', '.join(funcs)}): "
                             f"name one")
        name = next(iter(funcs))
    if name not in funcs:
        raise ValueError(f"function {name!r} not in the SASS text (has {', '.join(funcs)})")
    return Function(name, funcs[name])


# ----------------------------------------------------------------------------- the step

def _is_work(i: Insn) -> bool:
    return i.base in TENSOR_CORE | FMA | GLOBAL_STORES


def find_time_loop(fn: Function) -> Tuple[Optional[Loop], str]:
    """The time loop and the rule that picked it (see the module docstring)."""
    def outermost(pred):
        cands = [lp for lp in fn.loops if pred(lp)]
        if not cands:
            return None
        return min(cands, key=lambda lp: (lp.depth, -len(lp.blocks)))
    lp = outermost(lambda lp: any(d.spin for d in _descendants(lp)))
    if lp is not None:
        return lp, "outermost loop containing a grid barrier (spin loop)"
    lp = outermost(lambda lp: not lp.spin and fn.contains(lp, _is_work))
    if lp is not None:
        return lp, "outermost loop containing tensor-core ops, FMAs or global stores"
    return None, "no loop with work: the whole kernel is one step"


def _descendants(lp: Loop) -> List[Loop]:
    out, stack = [], list(lp.children)
    while stack:
        c = stack.pop()
        out.append(c)
        stack.extend(c.children)
    return out


TripFn = Callable[[Function, Loop], Tuple[Optional[int], str]]


@dataclasses.dataclass
class StepCounts:
    instructions: float = 0.0
    tensor_core: float = 0.0
    fma: float = 0.0
    global_loads: float = 0.0
    global_load_bytes_per_warp: float = 0.0       # width x 32 lanes, summed
    global_stores: float = 0.0
    shared_loads: float = 0.0
    shared_load_bytes_per_warp: float = 0.0
    shared_store_bytes_per_warp: float = 0.0
    # shared-memory operand bytes of warpgroup MMAs, per warp (a warpgroup's 4 warps each
    # issue the instruction; the operands are read once per warpgroup: bytes / 4 per warp)
    tensor_core_shared_bytes_per_warp: float = 0.0
    bar_sync: float = 0.0
    atomics: float = 0.0
    grid_barriers: float = 0.0
    # thread-block clusters (sm_90): barrier.cluster waits (UCGABAR_WAIT) and the bytes of
    # generic stores (ST), which in a kernel with cluster barriers are the DSMEM stores
    cluster_barriers: float = 0.0
    generic_store_bytes_per_warp: float = 0.0
    spill_instructions: float = 0.0
    load_widths: Dict[str, float] = dataclasses.field(default_factory=dict)
    opcodes: Dict[str, float] = dataclasses.field(default_factory=dict)


def _gmma_shared_bytes(i: "Insn") -> int:
    """Shared-memory bytes one warpgroup MMA reads: B always (``gdesc``), A too when it is a
    descriptor rather than registers.  ``HGMMA.64xNxK`` with 16-bit operands (8-bit for
    IGMMA/QGMMA)."""
    shape = next((m for m in i.mods if re.match(r"64x\d+x\d+$", m)), None)
    if shape is None:
        return 0
    m, n, k = (int(v) for v in shape.split("x"))
    esize = 1 if i.base in ("IGMMA", "QGMMA") else 2
    a_shared = len(i.operands) > 1 and "gdesc" in i.operands[1]
    return (m * k * esize if a_shared else 0) + n * k * esize


def _ldsm_bytes(i: Insn) -> int:
    return 128 * _ldsm_count(i)   # one 8x8 matrix of 16-bit elements = 128 bytes per warp


def _count(ins: Insn, w: float, c: StepCounts) -> None:
    if ins.base == "NOP":
        return
    c.instructions += w
    c.opcodes[ins.base] = c.opcodes.get(ins.base, 0.0) + w
    if ins.base in TENSOR_CORE:
        c.tensor_core += w
    elif ins.base in FMA:
        c.fma += w
    if ins.base in GLOBAL_LOADS:
        c.global_loads += w
        c.global_load_bytes_per_warp += w * ins.width() * 32
        key = ".".join([ins.base] + [m for m in ins.mods if m in WIDTH]) or ins.base
        c.load_widths[key] = c.load_widths.get(key, 0.0) + w
    elif ins.base in GLOBAL_STORES:
        c.global_stores += w
        if ins.base == "ST":
            c.generic_store_bytes_per_warp += w * ins.width() * 32
    elif ins.base == "LDS":
        c.shared_loads += w
        c.shared_load_bytes_per_warp += w * ins.width() * 32
    elif ins.base == "LDSM":
        c.shared_loads += w
        c.shared_load_bytes_per_warp += w * _ldsm_bytes(ins)
    elif ins.base in ("STS", "STSM"):
        c.shared_store_bytes_per_warp += w * (ins.width() * 32 if ins.base == "STS"
                                              else _ldsm_bytes(ins))
    if ins.base in ("HGMMA", "IGMMA", "QGMMA", "BGMMA"):
        c.tensor_core_shared_bytes_per_warp += w * _gmma_shared_bytes(ins) / 4
    if ins.base == "BAR" and "SYNC" in ins.mods:
        c.bar_sync += w
    if ins.base == "UCGABAR_WAIT":
        c.cluster_barriers += w
    if ins.base in ATOMICS:
        c.atomics += w
    if ins.base in ("STL", "LDL"):
        c.spill_instructions += w


class _Dataflow:
    """Per-register values through one step: longest tensor-core chain and load depth."""

    def __init__(self):
        self.chain: Dict[str, float] = {}
        self.depth: Dict[str, float] = {}
        self.max_chain = 0.0
        self.seg_depth = 0.0
        self.segments: List[float] = []

    def step(self, ins: Insn) -> None:
        reads = ins.regs_read()
        c_in = max((self.chain.get(r, 0.0) for r in reads), default=0.0)
        d_in = max((self.depth.get(r, 0.0) for r in reads), default=0.0)
        c_out = c_in + 1 if ins.base in TENSOR_CORE else c_in
        d_out = d_in + 1 if ins.base in ("LDG", "LD") else d_in
        for r in ins.regs_written():
            self.chain[r] = c_out
            self.depth[r] = d_out
        self.max_chain = max(self.max_chain, c_out)
        self.seg_depth = max(self.seg_depth, d_out)

    def barrier(self) -> None:
        self.segments.append(self.seg_depth)
        self.seg_depth = 0.0
        self.depth = {}

    def snapshot(self):
        return dict(self.chain), dict(self.depth), self.max_chain, self.seg_depth

    def extrapolate(self, s1, s2, n: int) -> None:
        """After two simulated iterations (s1, s2 = snapshots), continue linearly to n."""
        if n <= 2:
            return
        for key, a, b in (("chain", s1[0], s2[0]), ("depth", s1[1], s2[1])):
            table = getattr(self, key)
            for r in b:
                table[r] = b[r] + (b[r] - a.get(r, 0.0)) * (n - 2)
        self.max_chain = s2[2] + max(0.0, s2[2] - s1[2]) * (n - 2)
        self.seg_depth = s2[3] + max(0.0, s2[3] - s1[3]) * (n - 2)


def analyze(fn: Function, trip_of: Optional[TripFn] = None, time_loop: str = "auto",
            warps: int = 1) -> dict:
    """Per-step counts of ``fn``.  ``time_loop``: ``"auto"`` (see :func:`find_time_loop`) or
    ``"none"`` (the whole kernel is one step).  Returns a dict (see the keys below)."""
    if time_loop == "none":
        tl, rule = None, "kernel launched once per step: the whole kernel is one step"
    else:
        tl, rule = find_time_loop(fn)
    counts = StepCounts()
    loops_out, unweighted = [], []
    trips: Dict[int, int] = {}

    def trip(lp: Loop) -> int:
        if id(lp) in trips:
            return trips[id(lp)]
        if lp.spin:
            n, how = 1, "spin loop (barrier wait): counted once"
        elif trip_of is None:
            n, how = None, "no trip-count rule"
        else:
            n, how = trip_of(fn, lp)
        if n is None:
            unweighted.append(describe_loop(fn, lp))
            n, how = 1, how + " (unknown: counted once)"
        loops_out.append(dict(describe_loop(fn, lp), trips=n, how=how, spin=lp.spin))
        trips[id(lp)] = max(1, int(n))
        return trips[id(lp)]

    flow = _Dataflow()

    def walk(blocks: Iterable[int], children: List[Loop], weight: float, simulate: bool):
        child_at = {min(c.blocks): c for c in children}
        inner = set()
        for c in children:
            inner |= c.blocks
        for b in sorted(blocks):
            if b in child_at:
                c = child_at[b]
                n = trip(c)
                if c.spin:
                    if not simulate:
                        counts.grid_barriers += weight
                        for ins in fn.loop_insns(c):
                            _count(ins, weight, counts)
                    for ins in fn.loop_insns(c):
                        flow.step(ins)
                    flow.barrier()
                    continue
                _walk_loop(c, weight * n, simulate, n)
                continue
            if b in inner:
                continue
            for ins in fn.blocks[b].insns:
                if not simulate:
                    _count(ins, weight, counts)
                flow.step(ins)

    def _walk_loop(c: Loop, w: float, simulate: bool, n: int):
        own = set(c.blocks)
        # the first pass counts (weight w), the passes after it only simulate the dataflow
        walk(own, c.children, w, simulate)
        if n >= 2:
            s1 = flow.snapshot()
            walk(own, c.children, w, True)
            s2 = flow.snapshot()
            flow.extrapolate(s1, s2, n)

    if tl is None:
        walk(sorted(fn.reachable), fn.top_loops(), 1.0, False)
        chain = flow.max_chain
        # launched once per step: every segment starts from memory
        exchange = sum(flow.segments) + flow.seg_depth
        step_blocks = sorted(fn.reachable)
    else:
        walk(tl.blocks, tl.children, 1.0, False)
        chain = flow.max_chain
        done = len(flow.segments)
        # a second pass (dataflow only) closes the segment that wraps around the back edge
        walk(tl.blocks, tl.children, 1.0, True)
        barriers = int(round(counts.grid_barriers))
        exchange = sum(flow.segments[done:done + barriers]) if barriers else 0.0
        step_blocks = sorted(tl.blocks)
    lines = sorted({(i.file, i.line) for b in step_blocks for i in fn.blocks[b].insns
                    if i.file})
    return {
        "time_loop": describe_loop(fn, tl) if tl is not None else None,
        "time_loop_rule": rule,
        "counts": counts,
        "dependent_tensor_core_chain": chain,
        "exchange_round_trips": exchange,
        "loops": loops_out,
        "unweighted_loops": unweighted,
        "warps": warps,
        "source_lines": len(lines),
    }


@functools.lru_cache(maxsize=None)
def source_lines(path: str) -> Optional[Tuple[str, ...]]:
    """The lines of a source file named by the line information (None if unreadable)."""
    try:
        with open(path) as f:
            return tuple(f.read().splitlines())
    except OSError:
        return None


def loop_statement(fn: Function, loop: Loop) -> Optional[Tuple[str, int, str]]:
    """``(file, line, text)`` of the ``for``/``while`` statement behind a SASS loop: among
    the source lines of the loop's own instructions (not those of the loops inside it), the
    loop statements that no inner loop claims, preferring the line of the back-edge branch,
    then the most frequent."""
    cache = fn.__dict__.setdefault("_statements", {})
    if id(loop) in cache:
        return cache[id(loop)]
    claimed = set()
    for c in _descendants(loop):
        st = loop_statement(fn, c)
        if st is not None:
            claimed.add(st[:2])
    counts: Dict[Tuple[str, int], int] = {}
    for b in loop.own_blocks():
        for ins in fn.blocks[b].insns:
            if ins.file and ins.line:
                counts[(ins.file, ins.line)] = counts.get((ins.file, ins.line), 0) + 1
    latch_lines = set()
    for b in loop.latches:
        last = fn.blocks[b].insns[-1]
        if last.file and last.line:
            latch_lines.add((last.file, last.line))
    cands = []
    for (path, line), n in counts.items():
        src = source_lines(path)
        if (path, line) in claimed or src is None or not 0 < line <= len(src):
            continue
        text = src[line - 1].strip()
        if re.match(r"(for|while)\b", text):
            cands.append(((path, line) in latch_lines, n, path, line, text))
    best = None
    if cands:
        cands.sort(reverse=True)
        _, _, path, line, text = cands[0]
        best = (path, line, text)
    cache[id(loop)] = best
    return best


def describe_loop(fn: Function, lp: Optional[Loop]) -> dict:
    if lp is None:
        return {}
    ins = fn.loop_insns(lp)
    st = loop_statement(fn, lp)
    return {"header": f"0x{fn.blocks[lp.header].start:04x}",
            "instructions": len(ins),
            "depth": lp.depth,
            "source": f"{os.path.basename(st[0])}:{st[1]}" if st else None,
            "statement": st[2] if st else None}

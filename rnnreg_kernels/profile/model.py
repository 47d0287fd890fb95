"""The estimate of µs per time step from the static SASS counts (an estimate, not a measurement).

Per step, for the programs (thread blocks) of one SM of an H100/H200 (sm_90)::

    resident = programs one SM holds (registers, shared memory, warps; 1 for persistent grids)
    active   = min(resident, ceil(programs / SMs));  waves = ceil(programs / (SMs * resident))
    issue    = instructions_per_warp_per_step * ceil(active * warps / SCHEDULERS)  [cycles]
    chain    = dependent_tensor_core_chain * TENSOR_CORE_LATENCY                [cycles]
    exchange = exchange_round_trips * L2_LATENCY                                [cycles]
    barrier  = grid_barriers * BARRIER_ROUND_TRIPS * L2_FAR_LATENCY             [cycles]
    cta_sync = bar_sync_per_step * BAR_SYNC_LATENCY                             [cycles]
    l2       = active * global_load_bytes_per_step / L2_BYTES_PER_CYCLE_PER_SM   [cycles]
    smem     = active * shared_traffic_bytes_per_step / SHARED_BYTES_PER_CYCLE   [cycles]
    dsmem    = active * dsmem_store_bytes_per_step / DSMEM_BYTES_PER_CYCLE (clusters) [cycles]
    cluster  = cluster_barriers * CLUSTER_BARRIER_LATENCY (cluster kernels)       [cycles]
    us       = (waves * (max(issue, chain, l2, smem, dsmem) + exchange + cta_sync + cluster)
               + barrier) / CLOCK_MHZ + launches_per_step * LAUNCH_US

shared_traffic_bytes_per_step counts LDS/LDSM/STS/STSM bytes and the shared-memory operands of
warpgroup MMAs (HGMMA reads B, and A when A is a descriptor, from shared memory every step).
It is monotone in everything a kernel can improve: fewer instructions, fewer warps
replicating work, shorter dependent tensor-core chains, fewer bytes moved, fewer dependent
global round trips after a barrier, fewer barriers.  It ignores bank conflicts, dual issue
and the overlap of the exchange with independent work, so it can be off by a constant
factor: calibrate it with ``--measure`` on a GPU.
"""
from __future__ import annotations

import math
from typing import Optional

CONSTANTS = {
    "CLOCK_MHZ": {
        "value": 1980.0, "unit": "MHz",
        "source": "H100 SXM5 GPU boost clock 1.98 GHz (NVIDIA's final H100 specification, "
                  "tabulated at https://prohardver.hu/hir/nvidia_reszletezte_h100_gyorsitok_"
                  "specifikacio.html and https://glennklockwood.com/garden/processors/h100); "
                  "H200 is the same GH100 die. Sustained clocks can be lower (power limit)."},
    "SCHEDULERS": {
        "value": 4, "unit": "warp schedulers per SM, 1 instruction per cycle each",
        "source": "NVIDIA Hopper architecture (H100 whitepaper / 'NVIDIA Hopper Architecture "
                  "In-Depth'): 4 SM sub-partitions, one warp scheduler each; one program per "
                  "SM assumed (persistent grids are sized to the SM count)"},
    "L2_LATENCY": {
        "value": 265.0, "unit": "cycles",
        "source": "L2 hit latency measured by pointer chasing on an H100 PCIe at 1755 MHz: "
                  "265 cycles (151 ns) for the near L2 partition, te42kyfo/gpu-benches "
                  "gpu-latency/h100_pcie.txt"},
    "L2_FAR_LATENCY": {
        "value": 475.0, "unit": "cycles",
        "source": "same measurement, working sets past the near L2 partition (~25-50 MB): "
                  "about 475 cycles (270 ns); used for the atomics of a grid barrier, whose "
                  "counter lives in one L2 slice that most SMs reach through the far path "
                  "(assumption)"},
    "BARRIER_ROUND_TRIPS": {
        "value": 3, "unit": "L2 round trips per grid barrier",
        "source": "assumption: release (prior stores acknowledged), the arrive atomic, and the "
                  "acquire poll that sees the last arrival"},
    "TENSOR_CORE_LATENCY": {
        "value": 32.0, "unit": "cycles per dependent mma.sync (HMMA.16816)",
        "source": "assumption: latency of a dependent m16n8k16 HMMA on Ampere/Hopper-class "
                  "SMs is about 30-35 cycles in published microbenchmarks; not measured here"},
    "L2_BYTES_PER_CYCLE_PER_SM": {
        "value": 5120.0 / 132, "unit": "bytes per cycle per SM from L2 (all SMs loading)",
        "source": "assumption: the A100 whitepaper's L2 read bandwidth of 5120 bytes/clk for "
                  "the whole chip (NVIDIA A100 Tensor Core GPU Architecture, 2020), taken for "
                  "H100 too and shared by 132 SMs; every program of a persistent grid reads "
                  "the whole exchanged state each step, so the L2 is loaded by all SMs at once"},
    "SHARED_BYTES_PER_CYCLE": {
        "value": 128.0, "unit": "bytes per cycle per SM",
        "source": "CUDA C++ Programming Guide (compute capability 9.0): shared memory has 32 "
                  "banks of 4 bytes, each serving one 32-bit access per clock"},
    "BAR_SYNC_LATENCY": {
        "value": 24.0, "unit": "cycles per BAR.SYNC (thread-block barrier)",
        "source": "assumption: a CTA barrier with all warps arriving together costs a few "
                  "tens of cycles"},
    "REGISTERS_PER_SM": {
        "value": 65536, "unit": "32-bit registers per SM",
        "source": "CUDA C++ Programming Guide, compute capability 9.0 technical specifications"},
    "SHARED_PER_SM": {
        "value": 233472, "unit": "bytes of shared memory per SM (228 KiB)",
        "source": "CUDA C++ Programming Guide / Hopper tuning guide: 228 KiB per SM on "
                  "compute capability 9.0 (227 KiB usable by one block)"},
    "MAX_WARPS_PER_SM": {
        "value": 64, "unit": "resident warps per SM",
        "source": "CUDA C++ Programming Guide, compute capability 9.0 technical specifications"},
    "CLUSTER_BARRIER_LATENCY": {
        "value": 500.0, "unit": "cycles per barrier.cluster (arrive.release + wait.acquire)",
        "source": "assumption: the release half is a MEMBAR.ALL.GPU in the SASS (it drains the "
                  "CTA's outstanding global stores, about one far-L2 round trip, 475 cycles, "
                  "when they are recent) plus the arrival signal over the SM-to-SM network of "
                  "the GPC; published Hopper microbenchmarks put a distributed-shared-memory "
                  "access at a few hundred cycles (Luo et al., 'Benchmarking and Dissecting the "
                  "Nvidia Hopper GPU Architecture', 2024); not measured here"},
    "DSMEM_BYTES_PER_CYCLE": {
        "value": 32.0, "unit": "bytes per cycle per SM into other SMs' shared memory",
        "source": "assumption: one 32-byte sector per cycle per SM on the SM-to-SM network "
                  "(NVIDIA's Hopper tuning guide asks for 32-byte aligned, coalesced DSMEM "
                  "accesses, like global memory); not measured here"},
    "LAUNCH_US": {
        "value": 2.5, "unit": "µs per kernel launch",
        "source": "assumption: back-to-back launches of a small kernel from Python "
                  "(per-step variant only); CUDA graphs would lower it"},
}

FORMULA = ("us_per_step = (waves * (max(instructions_per_warp_per_step * ceil(active * warps "
           "/ SCHEDULERS), dependent_tensor_core_chain * TENSOR_CORE_LATENCY, active * "
           "global_load_bytes_per_step / L2_BYTES_PER_CYCLE_PER_SM, active * "
           "shared_traffic_bytes_per_step / SHARED_BYTES_PER_CYCLE, active * "
           "dsmem_store_bytes_per_step / DSMEM_BYTES_PER_CYCLE) + exchange_round_trips * "
           "L2_LATENCY + bar_sync_per_step * BAR_SYNC_LATENCY + cluster_barriers * "
           "CLUSTER_BARRIER_LATENCY) + grid_barriers * "
           "BARRIER_ROUND_TRIPS * L2_FAR_LATENCY) / CLOCK_MHZ + launches_per_step * LAUNCH_US; "
           "waves = ceil(programs / (SMs * resident)), active = min(resident, ceil(programs / "
           "SMs)), resident = programs per SM allowed by registers (65536 per SM), shared "
           "memory (228 KiB per SM) and warps (64 per SM)")


def value(name: str) -> float:
    return CONSTANTS[name]["value"]


def describe() -> dict:
    """The model for the JSON: formula, constants with their sources, what it leaves out."""
    return {"kind": "estimate (static SASS counts x latencies; not measured on a GPU)",
            "formula": FORMULA, "constants": CONSTANTS,
            "ignores": "bank conflicts, dual issue, overlap of the exchange with independent "
                       "work, branch outcomes (all paths counted)"}


def resident_programs(warps: int, registers: Optional[int], shared_bytes: int) -> int:
    """Programs one SM can hold (registers allocated per warp in units of 256)."""
    limits = [value("MAX_WARPS_PER_SM") // max(1, warps), 32]
    if registers:
        per_warp = -(-registers * 32 // 256) * 256
        limits.append(int(value("REGISTERS_PER_SM")) // (per_warp * max(1, warps)))
    if shared_bytes:
        limits.append(int(value("SHARED_PER_SM")) // shared_bytes)
    return max(1, min(limits))


def estimate(instructions: float, warps: int, chain: float, exchange_round_trips: float,
             grid_barriers: float, bar_sync: float, launches_per_step: float = 0.0,
             programs: int = 1, sm_count: int = 132, registers: Optional[int] = None,
             shared_bytes: int = 0, global_load_bytes: float = 0.0,
             shared_traffic_bytes: float = 0.0, cluster_barriers: float = 0.0,
             dsmem_bytes: float = 0.0) -> dict:
    """Estimated µs per step and its parts (cycles).

    ``shared_bytes`` is a program's shared-memory allocation (residency);
    ``global_load_bytes`` and ``shared_traffic_bytes`` are per program per step (shared:
    loads, stores and the warpgroup MMAs' shared-memory operands): their transfer times are
    throughput limits that overlap with issue and the tensor-core chain (the max)."""
    resident = resident_programs(warps, registers, shared_bytes)
    active = min(resident, -(-programs // sm_count))
    waves = -(-programs // (sm_count * resident))
    issue = instructions * math.ceil(active * max(1, warps) / value("SCHEDULERS"))
    chain_c = chain * value("TENSOR_CORE_LATENCY")
    l2 = active * global_load_bytes / value("L2_BYTES_PER_CYCLE_PER_SM")
    smem = active * shared_traffic_bytes / value("SHARED_BYTES_PER_CYCLE")
    exchange = exchange_round_trips * value("L2_LATENCY")
    barrier = grid_barriers * value("BARRIER_ROUND_TRIPS") * value("L2_FAR_LATENCY")
    cta = bar_sync * value("BAR_SYNC_LATENCY")
    cluster = cluster_barriers * value("CLUSTER_BARRIER_LATENCY")
    parts = {"issue": issue, "tensor-core chain": chain_c, "L2 bandwidth": l2,
             "shared-memory bandwidth": smem}
    if dsmem_bytes:
        parts["DSMEM bandwidth"] = active * dsmem_bytes / value("DSMEM_BYTES_PER_CYCLE")
    bound = max(parts, key=parts.get)
    cycles = waves * (parts[bound] + exchange + cta + cluster) + barrier
    us = cycles / value("CLOCK_MHZ") + launches_per_step * value("LAUNCH_US")
    return {"estimated_us_per_step": round(us, 3),
            "cycles": {"issue": round(issue, 1), "tensor_core_chain": round(chain_c, 1),
                       "l2_bandwidth": round(l2, 1), "shared_bandwidth": round(smem, 1),
                       "exchange": round(exchange, 1), "grid_barriers": round(barrier, 1),
                       "bar_sync": round(cta, 1), "total": round(cycles, 1),
                       **({"cluster_barriers": round(cluster, 1),
                           "dsmem_bandwidth": round(parts.get("DSMEM bandwidth", 0.0), 1)}
                          if cluster_barriers or dsmem_bytes else {})},
            "bound": bound,
            "programs": programs, "resident_per_sm": resident, "active_per_sm": active,
            "waves": waves, "launches_per_step": launches_per_step}

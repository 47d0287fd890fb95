// Thread-block cluster primitives for the Hopper cluster variant (cluster.cu), sm_90+:
//   cluster_rank():            %cluster_ctarank (the CTA's rank in its cluster)
//   cluster_map(p, r):         mapa.shared::cluster: the address of local shared pointer p in the
//                              shared memory of the cluster's CTA r (distributed shared memory)
//   cluster_st16(a, v):        st.shared::cluster.v4.u32 (16 bytes into another CTA's smem)
//   cluster_ld_f32(a):         ld.shared::cluster.f32
//   cluster_arrive() / cluster_wait(): barrier.cluster.arrive.release.aligned /
//                              barrier.cluster.wait.acquire.aligned (split cluster barrier)
// and their CPU emulation (csrc/emu/emu_cluster.h: one std::barrier per cluster, DSMEM as
// pointers into the other emulated blocks' shared memory) for tests/test_cuda_cluster.py.
// Shared by the cluster forward (cluster.cu) and backward (cluster_backward.cu):
//   cluster_product:           the tensor-core step product of a CTA (weights as the m16 side)
//   cluster_try_plan & co.:    the split / batch-slice planner, parameterized by direction
//   cluster_config, cluster_set_attributes: the launch configuration
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#ifdef RNNREG_EMULATE
#include "emu_cluster.h"
#endif

#include "cluster_api.h"
#include "common.cuh"

namespace rnnreg {

#ifdef RNNREG_EMULATE

using cluster_addr = uintptr_t;
__device__ inline int cluster_rank() { return emu::cluster_rank(); }
__device__ inline cluster_addr cluster_map(const void* p, int rank) {
  return emu::cluster_map(p, rank);
}
__device__ inline void cluster_st16(cluster_addr a, const uint4& v) { emu::cluster_st16(a, v); }
__device__ inline float cluster_ld_f32(cluster_addr a) { return emu::cluster_ld_f32(a); }
__device__ inline void cluster_arrive() { emu::cluster_arrive(); }
__device__ inline void cluster_wait() { emu::cluster_wait(); }

#else

using cluster_addr = uint32_t;
__device__ __forceinline__ int cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return (int)r;
}
__device__ __forceinline__ cluster_addr cluster_map(const void* p, int rank) {
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  return remote;
}
__device__ __forceinline__ void cluster_st16(cluster_addr a, const uint4& v) {
  asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ float cluster_ld_f32(cluster_addr a) {
  float f;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(f) : "r"(a) : "memory");
  return f;
}
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

#endif

__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}


// ----------------------------------------------------------------------------- step product

__host__ __device__ inline int cl_round8(int x) { return (x + 7) / 8 * 8; }

// Scratch of cluster_product (K parts: kWarps items x 2 n8 tiles x 32 lanes x 4 floats), of
// the FFMA product (kRedFloats) and of the final penalty sums (kWarps x 3).
constexpr int kClusterRedFloats = kWarps * 2 * 128 > kRedFloats ? kWarps * 2 * 128 : kRedFloats;

// One work item of cluster_product: m16 tile `mt` of the weight rows, K steps kp, kp + KP, ...
// (4 interleaved accumulators per n8 tile, summed in a fixed order), NTG n8 tiles of batch
// rows from nt0.  KP == 1: the tiles go to `out`; else to red[item][j][lane][4].
template <typename T, int NTG>
__device__ __forceinline__ void cluster_item(const T* X, int M, const T* W, int N, int ld, int KS,
                                             int KP, int item, int nt0, float* out, int ldo,
                                             float* red) {
  using F = Frag<T>;
  const int lane = threadIdx.x % 32;
  const int mt = item / KP, kp = item % KP;
  const int ao = F::a_off(mt * 16, N, ld, lane, 0), ao8 = F::a_off(mt * 16, N, ld, lane, 1);
  int bo[NTG];
#pragma unroll
  for (int j = 0; j < NTG; ++j) bo[j] = F::b_off((nt0 + j) * 8, M, ld, lane);
  float acc[4][NTG][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int j = 0; j < NTG; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][j][e] = 0.f;
  // K steps kp, kp + KP, ...: groups of 4 on 4 accumulators, then the tail on the first.
  const int nmain = KS - 3 * KP > kp ? (KS - 3 * KP - kp + 4 * KP - 1) / (4 * KP) : 0;
#pragma unroll 1
  for (int it = 0; it < nmain; ++it) {
    const int ks = kp + it * 4 * KP;
    uint32_t af[4][4], bf[4][NTG][2];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int k0 = (ks + r * KP) * F::KS;
      F::load_a(af[r], W, ao + k0, ao8 + k0);
#pragma unroll
      for (int j = 0; j < NTG; ++j) F::load_b(bf[r][j], X, bo[j] + k0);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int j = 0; j < NTG; ++j) F::mma(acc[r][j], af[r], bf[r][j]);
  }
#pragma unroll 1
  for (int kt = kp + nmain * 4 * KP; kt < KS; kt += KP) {
    uint32_t af[4], bf[NTG][2];
    F::load_a(af, W, ao + kt * F::KS, ao8 + kt * F::KS);
#pragma unroll
    for (int j = 0; j < NTG; ++j) F::load_b(bf[j], X, bo[j] + kt * F::KS);
#pragma unroll
    for (int j = 0; j < NTG; ++j) F::mma(acc[0][j], af, bf[j]);
  }
#pragma unroll
  for (int r = 1; r < 4; ++r)
#pragma unroll
    for (int j = 0; j < NTG; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[0][j][e] += acc[r][j][e];
  const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int j = 0; j < NTG; ++j) {
    if (KP == 1) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = mt * 16 + gid + 8 * (e >> 1), m = (nt0 + j) * 8 + 2 * tig + (e & 1);
        if (n < N && m < M) out[(size_t)m * ldo + n] = acc[0][j][e];
      }
    } else {
      float4 v;
      v.x = acc[0][j][0]; v.y = acc[0][j][1]; v.z = acc[0][j][2]; v.w = acc[0][j][3];
      *reinterpret_cast<float4*>(red + ((size_t)(item * 2 + j) * 32 + lane) * 4) = v;
    }
  }
}

// The step product of the cluster kernel: out[m * ldo + n] = sum_k X[m][k] W[n][k] for the M
// staged batch rows X ([M][ld], dtype T) and the CTA's N weight rows W ([N][ld]), K padded to
// Kp with zeros.  A batch slice is short (a few rows), so the weights are the m16 side of the
// mma (A operand, ldmatrix.x4) and the batch rows the n8 side (B, ldmatrix.x2; rows past M
// read row M-1, their results are dropped): no m16 tile is padded with copies of 4 batch rows.
// The m16 tiles of weight rows are dealt to the warps, with K split into KP = kWarps / MT
// parts when there are fewer tiles than warps; the parts are added in a fixed order through
// `red` (deterministic).  NTG n8 tiles of batch rows per pass (a kernel template argument,
// so that only one shape is compiled per kernel; with NTG = 2 and an odd number of tiles the
// last pass's second tile reads row M-1 and is dropped).  fp32: TF32 mma when `tf32`, else the
// FFMA block_matvec of common.cuh.  Called by all threads; ends with a __syncthreads.
template <typename T, int NTG>
__device__ void cluster_product(const T* X, int M, const T* W, int N, int ld, int Kp, bool tf32,
                                float* out, int ldo, float* red) {
  if constexpr (std::is_same<T, float>::value) {
    if (!tf32) {
      block_matvec<float>(W, N, X, M, ld, out, ldo, red);
      __syncthreads();
      return;
    }
  }
  (void)tf32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int MT = (N + 15) / 16, NT = (M + 7) / 8, KS = Kp / Frag<T>::KS;
  const int KP = MT >= kWarps ? 1 : kWarps / MT;
  const int work = MT * KP;
  for (int nt0 = 0; nt0 < NT; nt0 += NTG) {
    #pragma unroll 1
    for (int item = warp; item < work; item += kWarps)
      cluster_item<T, NTG>(X, M, W, N, ld, KS, KP, item, nt0, out, ldo, red);
    __syncthreads();
    // K parts: one (tile, lane) float4 per thread, summed in a fixed order.
    const int ntg = NTG, red_n = KP > 1 ? MT * ntg * 32 : 0;
    #pragma unroll 1
    for (int idx = threadIdx.x; idx < red_n; idx += kThreads) {
      const int t = idx / 32, l = idx % 32, mt = t / ntg, j = t % ntg;
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
      #pragma unroll 1
      for (int kp = 0; kp < KP; ++kp) {
        const float4 v =
            reinterpret_cast<const float4*>(red)[((size_t)((mt * KP + kp) * 2 + j)) * 32 + l];
        sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
      }
      const float vals[4] = {sum.x, sum.y, sum.z, sum.w};
      const int gid = l >> 2, tig = l & 3;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = mt * 16 + gid + 8 * (e >> 1), m = (nt0 + j) * 8 + 2 * tig + (e & 1);
        if (n < N && m < M) out[(size_t)m * ldo + n] = vals[e];
      }
    }
    __syncthreads();
  }
  (void)lane;
}

// ----------------------------------------------------------------------------- launch

inline cudaLaunchConfig_t cluster_config(const ClusterPlan& p, cudaLaunchAttribute* attr,
                                  cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)(p.csize * p.clusters));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = p.smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = (unsigned)p.csize;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

inline cudaError_t cluster_set_attributes(const void* fn, const ClusterPlan& p) {
  cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)p.smem);
  if (e == cudaSuccess && p.csize > 8)
    e = cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  return e;
}

inline int cluster_compute_major(int device) {
#ifdef RNNREG_EMULATE
  (void)device;
  return 9;  // the emulation stands for a Hopper GPU
#else
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return 0;
  return major;
#endif
}

inline const char* cl_cell_name(int cell) {
  switch (cell) {
    case kLSTM: return "lstm";
    case kReLU: return "relu";
    case kTanh: return "tanh";
    default: return "trec";
  }
}


// ----------------------------------------------------------------------------- planner
// The direction-specific parts of the cluster planner: the shared-memory bytes of a CTA for
// a batch slice of bs rows, the kernel (for the occupancy query), the name in messages.
struct ClusterPlanKind {
  const char* name;  // "the cluster variant" / "the cluster variant's backward"
  size_t (*bytes)(int G, int H, int units, int bs, int es);
  const void* (*kernel)(int dtype, int bs, int cell);
};

// The plan without the device-wide H search (cluster_plan_or_why adds it to the message).
// CTA r of a cluster owns units [r*units, r*units + units), units = round8(ceil(H / cmax));
// as many clusters as fit at once (at least one batch row each), then the largest batch slice
// that fits in shared memory.
inline std::string cluster_try_plan(const ClusterPlanKind& kind, int cell, int dtype, int B,
                                    int H, int device, int units_override, int csize_max,
                                    ClusterPlan* plan, int* smem_limit) {
  if (cell < kLSTM || cell > kTrec)
    return "the cluster variant runs the lstm, relu, tanh and trec cells only";
  int sms = 0, optin = 0;
  cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess)
    return std::string("querying device ") + std::to_string(device) + " failed: " +
           cudaGetErrorString(e);
  *smem_limit = optin;
  const int major = cluster_compute_major(device);
  if (major < 9)
    return "the cluster variant needs thread-block clusters and distributed shared memory "
           "(compute capability 9.0+), device " + std::to_string(device) + " has major " +
           std::to_string(major);
  const int G = gates_of(cell), es = dtype_size(dtype);
  const int cmax = csize_max > 0 ? (csize_max < 16 ? csize_max : 16) : 16;
  ClusterPlan p;
  p.units = cl_round8(units_override > 0 ? units_override : (H + cmax - 1) / cmax);
  p.csize = (H + p.units - 1) / p.units;
  if (p.csize > 16)
    return std::to_string(p.units) + " units per CTA need " + std::to_string(p.csize) +
           " CTAs per cluster, more than the 16 of sm_90";
  const size_t one = kind.bytes(G, H, p.units, 1, es);
  if (one > (size_t)optin)
    return "the w_hh slice of " + std::to_string(p.units) + " units x " + std::to_string(G * H) +
           " weights per CTA (a cluster of " + std::to_string(p.csize) + ") needs " +
           std::to_string(one / 1024) + " KiB of shared memory, more than the " +
           std::to_string(optin / 1024) + " KiB of this device";
  const void* fn = kind.kernel(dtype, 1, cell);
  p.bs = 1;
  p.clusters = 1;
  p.smem = one;
  cudaLaunchAttribute attr[1];
  int active = 0;
  e = cluster_set_attributes(fn, p);
  if (e == cudaSuccess) {
    const cudaLaunchConfig_t cfg = cluster_config(p, attr, nullptr);
    e = cudaOccupancyMaxActiveClusters(&active, fn, &cfg);
  }
  if (e != cudaSuccess)
    return std::string("cluster occupancy query failed: ") + cudaGetErrorString(e);
  if (active < 1)
    return "a cluster of " + std::to_string(p.csize) + " CTAs with " +
           std::to_string(p.smem / 1024) + " KiB of shared memory each cannot be scheduled";
  int bs = (B + active - 1) / active;
  while (bs > 1 && kind.bytes(G, H, p.units, bs, es) > (size_t)optin) --bs;
  p.bs = bs;
  p.clusters = (B + bs - 1) / bs;
  p.smem = kind.bytes(G, H, p.units, bs, es);
  *plan = p;
  return "";
}

// The largest H for which cluster_try_plan succeeds with the default split (0 if none).
inline int cluster_search_max_hidden(const ClusterPlanKind& kind, int cell, int dtype, int B,
                                     int device, int csize_max) {
  ClusterPlan p;
  int optin = 0;
  int lo = 0, hi = 1 << 14;
  if (cluster_try_plan(kind, cell, dtype, B, hi, device, 0, csize_max, &p, &optin).empty())
    return hi;
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (cluster_try_plan(kind, cell, dtype, B, mid, device, 0, csize_max, &p, &optin).empty())
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// "" and the plan, or why not, naming the largest H that fits this cell and dtype.
inline std::string cluster_plan_or_why(const ClusterPlanKind& kind, int cell, int dtype, int B,
                                       int H, int device, int units_override, int csize_max,
                                       ClusterPlan* plan) {
  int optin = 0;
  std::string why = cluster_try_plan(kind, cell, dtype, B, H, device, units_override, csize_max,
                                     plan, &optin);
  if (why.empty() || cell < kLSTM || cell > kTrec || optin == 0 ||
      cluster_compute_major(device) < 9)
    return why;
  const int hmax = cluster_search_max_hidden(kind, cell, dtype, B, device, csize_max);
  return std::string(kind.name) + " cannot keep w_hh in one cluster for cell=" +
         cl_cell_name(cell) + ", H=" + std::to_string(H) + ": " + why +
         ". On this device this cell and dtype fit H <= " + std::to_string(hmax) +
         " in a cluster; unset RNNREG_CUDA_VARIANT for the persistent kernels";
}

}  // namespace rnnreg

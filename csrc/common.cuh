// Device helpers shared by the forward and backward kernels: dtype conversion, warp sums,
// shared-memory layouts and the block-wide matrix-vector product of one step.
// No torch headers: this compiles with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "mma.cuh"
#include "rnnreg_api.h"

namespace rnnreg {

#ifndef RNNREG_THREADS
#define RNNREG_THREADS 256
#endif
constexpr int kThreads = RNNREG_THREADS;  // threads per block (the CPU emulation uses fewer)
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 8;                   // elements per shared-memory chunk (16 B of bf16)
constexpr int kRG = 4;                    // weight rows per matvec work item
constexpr int kBG = 4;                    // batch rows per matvec work item
constexpr int kRedFloats = kWarps * kRG * kBG;  // block scratch for split-K and final sums

__host__ __device__ inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
__host__ __device__ inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }

// Tensor-core product (bf16/fp16): 16-wide K steps dealt to the warps, up to kAccTiles
// independent 16x8 fp32 accumulators per warp, partial tiles summed through `red`.
constexpr int kAccTiles = 8;
constexpr int kMmaRedFloats = kWarps * kAccTiles * 128;

// Row length (elements) of the global exchange buffers for a K-long vector: a multiple of 16
// elements, so rows are 16-byte aligned and copy in whole 16-byte chunks; the padding is zero.
__host__ __device__ inline int xrow(int K) { return round_up(K, 16); }
// Row stride (elements) of a staged operand in shared memory.  bf16/fp16 rows get 8 elements
// (16 bytes) of padding: the stride is then an odd multiple of 16 bytes, so the 8 row
// addresses of one ldmatrix phase hit 8 distinct 16-byte bank groups (no conflicts).  The
// padding is never read.
// fp32 rows get 4 elements: the stride is 4 (mod 8) words, so the TF32 fragment loads (8
// rows x 4 consecutive words per warp) hit 32 distinct banks, and rows stay 16-byte aligned.
__host__ __device__ inline int srow(int K, int esize) { return xrow(K) + (esize == 2 ? 8 : 4); }
__host__ __device__ inline int red_floats(int) {
  return kMmaRedFloats > kRedFloats ? kMmaRedFloats : kRedFloats;
}

// Byte offsets into the dynamic shared memory of one block (rows of srow(K) elements).
//   forward:  w [G*units][srow(H)] (dtype), a = h tile [bs][srow(H)] (dtype),
//             z [bs][G*units], hn [bs][units] (float)
//   backward: w = W^T slice [units][srow(GH)] (dtype), a = dz tile [bs][srow(GH)] (dtype),
//             z = dh [bs][units] (float)
struct Layout {
  size_t w, a, z, hn, red, total;
};

__host__ __device__ inline Layout fwd_layout(int G, int H, int units, int bs, int esize) {
  const size_t ld = (size_t)srow(H, esize), R = (size_t)G * units;
  Layout l;
  l.w = 0;
  l.a = align16(R * ld * esize);
  l.z = align16(l.a + (size_t)bs * ld * esize);
  l.hn = align16(l.z + (size_t)bs * R * 4);
  l.red = align16(l.hn + (size_t)bs * units * 4);
  l.total = align16(l.red + (size_t)red_floats(esize) * 4);
  return l;
}

__host__ __device__ inline Layout bwd_layout(int G, int H, int units, int bs, int esize) {
  const size_t ld = (size_t)srow(G * H, esize);
  Layout l;
  l.w = 0;
  l.a = align16((size_t)units * ld * esize);
  l.z = align16(l.a + (size_t)bs * ld * esize);
  l.hn = l.z + (size_t)bs * units * 4;
  l.red = align16(l.hn);
  l.total = align16(l.red + (size_t)red_floats(esize) * 4);
  return l;
}

// The block's dynamic shared memory (the CPU emulation of tests/test_cuda_build.py supplies
// its own per-block buffer).
#ifdef RNNREG_EMULATE
__device__ inline unsigned char* dynamic_smem() { return emu::block_smem(); }
#else
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char rnnreg_smem[];
  return rnnreg_smem;
}
#endif

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}

// Eight consecutive elements (16-byte aligned) from shared memory, as floats.
__device__ __forceinline__ void load8(const float* p, float (&v)[kVec]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[kVec]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[kVec]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// Butterfly sum: every lane gets the same, order-fixed result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float sigmoidf_(float z) { return 1.f / (1.f + expf(-z)); }

// out[b * ldo + r] = sum_k W[r][k] * X[b][k] for r < R, b < NB, in fp32.
// W: [R][Kp] (dtype, shared), X: [NB][Kp] (float, shared), both zero-padded to Kp (a multiple
// of kVec).  Work items are kRG x kBG tiles; when there are fewer items than warps, the K
// range is split across warps and the partial sums are added in a fixed order through `red`
// (kRedFloats floats).  Called by all threads of the block; ends with the outputs written
// (a __syncthreads is needed before other threads read them).
template <typename T>
__device__ void block_matvec(const T* __restrict__ W, int R, const float* __restrict__ X,
                             int NB, int Kp, float* __restrict__ out, int ldo,
                             float* __restrict__ red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rgroups = (R + kRG - 1) / kRG, bgroups = (NB + kBG - 1) / kBG;
  const int items = rgroups * bgroups;
  const int nchunks = Kp / kVec;
  int ksplit = kWarps / items;
  if (ksplit < 1) ksplit = 1;
  const int wanted = (nchunks + 31) / 32;  // no point splitting beyond one chunk per lane
  if (ksplit > wanted) ksplit = wanted;
  const int work = items * ksplit;
  for (int w = warp; w < work; w += kWarps) {
    const int item = w % items, ks = w / items;
    const int r0 = (item % rgroups) * kRG, b0 = (item / rgroups) * kBG;
    const T* wr[kRG];
    const float* xb[kBG];
#pragma unroll
    for (int i = 0; i < kRG; ++i) wr[i] = W + (size_t)min(r0 + i, R - 1) * Kp;
#pragma unroll
    for (int j = 0; j < kBG; ++j) xb[j] = X + (size_t)min(b0 + j, NB - 1) * Kp;
    float acc[kRG][kBG];
#pragma unroll
    for (int i = 0; i < kRG; ++i)
#pragma unroll
      for (int j = 0; j < kBG; ++j) acc[i][j] = 0.f;
    for (int c = ks * 32 + lane; c < nchunks; c += 32 * ksplit) {
      float xv[kBG][kVec];
#pragma unroll
      for (int j = 0; j < kBG; ++j) load8(xb[j] + c * kVec, xv[j]);
#pragma unroll
      for (int i = 0; i < kRG; ++i) {
        float wv[kVec];
        load8(wr[i] + c * kVec, wv);
#pragma unroll
        for (int j = 0; j < kBG; ++j)
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[i][j] = fmaf(wv[e], xv[j][e], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < kRG; ++i)
#pragma unroll
      for (int j = 0; j < kBG; ++j) acc[i][j] = warp_sum(acc[i][j]);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kRG; ++i)
#pragma unroll
        for (int j = 0; j < kBG; ++j) {
          if (ksplit > 1) {
            red[(ks * items + item) * (kRG * kBG) + i * kBG + j] = acc[i][j];
          } else if (r0 + i < R && b0 + j < NB) {
            out[(size_t)(b0 + j) * ldo + r0 + i] = acc[i][j];
          }
        }
    }
  }
  if (ksplit > 1) {
    __syncthreads();
    for (int t = threadIdx.x; t < items * kRG * kBG; t += kThreads) {
      const int item = t / (kRG * kBG), i = (t / kBG) % kRG, j = t % kBG;
      const int r = (item % rgroups) * kRG + i, b = (item / rgroups) * kBG + j;
      float s = 0.f;
      for (int ks = 0; ks < ksplit; ++ks) s += red[(ks * items + item) * (kRG * kBG) + i * kBG + j];
      if (r < R && b < NB) out[(size_t)b * ldo + r] = s;
    }
    __syncthreads();  // `red` is reused by the next call
  }
}

// One mma K step of the operand fragments of this lane.  16-bit types: ldmatrix rows (A x4:
// matrix j = lane / 8 covers rows 8*(j & 1).., columns 8*(j >> 1)..: registers a0..a3 of the
// m16n8k16 A fragment; B x2: lanes 0-15, matrix j = lane / 8 covers k 8*j..: b0, b1, lanes
// 16-31 repeat the addresses of 0-15).  TF32: the lane's own elements (rows groupID and
// groupID + 8, columns threadID_in_group and + 4; csrc/emu/emu_mma.h has the maps).
template <typename T>
struct Frag {
  static constexpr bool kTf32 = std::is_same<T, float>::value;
  static constexpr int KS = kTf32 ? 8 : 16;  // K per mma
  // Element offset of this lane's first A element in row block `row0` (rows clamped to M-1),
  // and of its row + 8 (TF32 only).
  __device__ __forceinline__ static int a_off(int row0, int M, int ld, int lane, int plus8) {
    const int r = kTf32 ? (lane >> 2) + 8 * plus8 : (lane & 7) + 8 * ((lane >> 3) & 1);
    return min(row0 + r, M - 1) * ld + (kTf32 ? (lane & 3) : 8 * (lane >> 4));
  }
  __device__ __forceinline__ static int b_off(int row0, int N, int ld, int lane) {
#ifdef RNNREG_PLANT_FRAG
    const int r = (kTf32 ? lane >> 2 : lane & 7) + 1;  // planted off-by-one in B's n (test)
#else
    const int r = kTf32 ? lane >> 2 : lane & 7;
#endif
    return min(row0 + r, N - 1) * ld + (kTf32 ? (lane & 3) : 8 * ((lane >> 3) & 1));
  }
  __device__ __forceinline__ static void load_a(uint32_t (&f)[4], const T* A, int off, int off8) {
    if constexpr (kTf32) {
      f[0] = to_tf32(A[off]);
      f[1] = to_tf32(A[off8]);
      f[2] = to_tf32(A[off + 4]);
      f[3] = to_tf32(A[off8 + 4]);
    } else {
      (void)off8;
      ldmatrix_x4(f, A + off);
    }
  }
  __device__ __forceinline__ static void load_b(uint32_t (&f)[2], const T* Bm, int off) {
    if constexpr (kTf32) {
      f[0] = to_tf32(Bm[off]);
      f[1] = to_tf32(Bm[off + 4]);
    } else {
      ldmatrix_x2(f, Bm + off);
    }
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    if constexpr (kTf32) mma_1688_tf32(d, a, b);
    else mma_16816<T>(d, a, b);
  }
};

// Operand offsets of this lane for MTG row blocks of A from mt0 and NTG of Bm from nt0.
template <typename T, int MTG, int NTG>
__device__ __forceinline__ void frag_offsets(int (&ao)[MTG], int (&ao8)[MTG], int (&bo)[NTG],
                                             int M, int N, int ld, int mt0, int nt0) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < MTG; ++i) {
    ao[i] = Frag<T>::a_off((mt0 + i) * 16, M, ld, lane, 0);
    ao8[i] = Frag<T>::a_off((mt0 + i) * 16, M, ld, lane, 1);
  }
#pragma unroll
  for (int j = 0; j < NTG; ++j) bo[j] = Frag<T>::b_off((nt0 + j) * 8, N, ld, lane);
}

// One K step (at element k0) of MTG x NTG tiles: every fragment loaded, then the
// MTG * NTG independent mmas.
template <typename T, int MTG, int NTG>
__device__ __forceinline__ void mma_kstep(float (&acc)[MTG][NTG][4], const T* A, const T* Bm,
                                          const int (&ao)[MTG], const int (&ao8)[MTG],
                                          const int (&bo)[NTG], int k0) {
  uint32_t af[MTG][4], bf[NTG][2];
#pragma unroll
  for (int i = 0; i < MTG; ++i) Frag<T>::load_a(af[i], A, ao[i] + k0, ao8[i] + k0);
#pragma unroll
  for (int j = 0; j < NTG; ++j) Frag<T>::load_b(bf[j], Bm, bo[j] + k0);
#pragma unroll
  for (int i = 0; i < MTG; ++i)
#pragma unroll
    for (int j = 0; j < NTG; ++j) Frag<T>::mma(acc[i][j], af[i], bf[j]);
}

// The warp's partial tiles -> red[warp][slot][lane][4] (slot = flat accumulator index).
template <int S>
__device__ __forceinline__ void store_partials(const float (&acc)[S][4], float* red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    float4 v;
    v.x = acc[s][0]; v.y = acc[s][1]; v.z = acc[s][2]; v.w = acc[s][3];
    *reinterpret_cast<float4*>(red + ((size_t)(warp * kAccTiles + s) * 32 + lane) * 4) = v;
  }
}

// out[m * ldo + n] = sum_k A[m][k] * Bm[n][k] for m < M, n < N, on tensor cores with fp32
// accumulation: T = bf16/fp16 -> mma.m16n8k16 (operands through ldmatrix), T = float -> TF32
// mma.m16n8k8 (operands rounded with cvt.rna.tf32, loaded with conflict-free 32-bit LDS).
// A: [M][ld] and Bm: [N][ld] in shared memory, K zero-padded to Kp (a multiple of 16),
// ld = srow(Kp).  A rows are the m16 side, Bm rows the n8 side ("col" B operand = Bm^T); rows
// past M / N read row M-1 / N-1 and their results are dropped.  The output tiles go in groups
// of 2 x 4 tiles ("wide", N > 24) or 2 x 1 tiles with 4 accumulators each on interleaved K
// steps ("tall", N <= 24: shorter dependent mma chains, summed in registers at the end),
// kAccTiles accumulators per warp; the K steps are dealt round-robin to the warps, and the
// warps' partial tiles are added in a fixed order through `red` (kMmaRedFloats floats), so
// the result is deterministic.  Called by all
// threads; ends with a __syncthreads.
template <typename T>
__device__ void block_mma(const T* __restrict__ A, int M, const T* __restrict__ Bm, int N,
                          int ld, int Kp, float* __restrict__ out, int ldo,
                          float* __restrict__ red) {
  const int warp = threadIdx.x / 32;
  const int MT = (M + 15) / 16, NT = (N + 7) / 8;
  const int ksteps = Kp / Frag<T>::KS;
  const int nw = ksteps < kWarps ? ksteps : kWarps;
  const int mtg = 2, ntg = NT >= 4 ? 4 : 1, tiles = mtg * ntg;
  // K steps of this warp's loop in the chosen group shape (0 for the other one), so that each
  // loop's bound says whether it runs (the static profile reads the loop headers).
  const int ks_wide = warp < nw && ntg == 4 ? ksteps : 0;
  const int ks_tall = warp < nw && ntg == 1 ? ksteps : 0;
  for (int mt0 = 0; mt0 < MT; mt0 += mtg) {
    for (int nt0 = 0; nt0 < NT; nt0 += ntg) {
      if (ks_wide > 0) {
        int ao[2], ao8[2], bo[4];
        frag_offsets<T, 2, 4>(ao, ao8, bo, M, N, ld, mt0, nt0);
        float acc[2][4][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
        for (int ks = warp; ks < ks_wide; ks += nw)
          mma_kstep<T, 2, 4>(acc, A, Bm, ao, ao8, bo, ks * Frag<T>::KS);
        store_partials<8>(reinterpret_cast<const float(&)[8][4]>(acc), red);
      }
      if (ks_tall > 0) {
        int ao[2], ao8[2], bo[1];
        frag_offsets<T, 2, 1>(ao, ao8, bo, M, N, ld, mt0, nt0);
        float acc[4][2][1][4];  // [K interleave][mt][nt][4]
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[r][i][0][e] = 0.f;
        for (int ks = warp; ks < ks_tall; ks += 4 * nw) {
#pragma unroll
          for (int r = 0; r < 4; ++r)
            if (r == 0 || ks + r * nw < ksteps)
              mma_kstep<T, 2, 1>(acc[r], A, Bm, ao, ao8, bo, (ks + r * nw) * Frag<T>::KS);
        }
#pragma unroll
        for (int r = 1; r < 4; ++r)  // the K interleaves, in a fixed order
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[0][i][0][e] += acc[r][i][0][e];
        store_partials<2>(reinterpret_cast<const float(&)[2][4]>(acc[0]), red);
      }
      __syncthreads();
      // One (tile, lane) float4 per thread: the sum over the warps, in a fixed order.
      for (int idx = threadIdx.x; idx < tiles * 32; idx += kThreads) {
        const int t = idx / 32, l = idx % 32;
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
        const float4* part = reinterpret_cast<const float4*>(red) + t * 32 + l;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          if (w < nw) {
            const float4 v = part[w * kAccTiles * 32];
            sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
          }
        }
        const int m = (mt0 + t / ntg) * 16 + l / 4, n = (nt0 + t % ntg) * 8 + 2 * (l % 4);
        const float vals[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int mm = m + 8 * (i >> 1), nn = n + (i & 1);
          if (mm < M && nn < N) out[(size_t)mm * ldo + nn] = vals[i];
        }
      }
      __syncthreads();
    }
  }
}

// The step product of both kernels: out[m * ldo + n] = sum_k X[m][k] W[n][k] for the M staged
// rows X ([M][ld], dtype T) and the block's N resident rows W ([N][ld]), K padded to Kp =
// xrow(K) with zeros.  bf16/fp16: tensor cores (block_mma).  fp32: TF32 tensor cores when
// `tf32` (Spec.allow_tf32), else FP32 FMAs (block_matvec: exact fp32 products and sums).
// Ends with the outputs written and a __syncthreads.
template <typename T>
__device__ __forceinline__ void step_product(const T* X, int M, const T* W, int N, int ld, int Kp,
                                             bool tf32, float* out, int ldo, float* red) {
  if constexpr (std::is_same<T, float>::value) {
    if (tf32) {
      block_mma<float>(X, M, W, N, ld, Kp, out, ldo, red);
    } else {
      block_matvec<float>(W, N, X, M, ld, out, ldo, red);
      __syncthreads();
    }
  } else {
    block_mma<T>(X, M, W, N, ld, Kp, out, ldo, red);
  }
}

// ---------------------------------------------------------------------------------------------
// The forward's step product for bf16/fp16 (forward.cu): the A operand (the batch rows of h_{k-1})
// is read by every lane straight from the global exchange buffer into its mma fragment
// registers, no staging through shared memory.  The K columns are consumed in a permuted order:
// within each 16-wide K step, lane t = lane % 4 of fragment row r loads the 4 consecutive
// elements [4t, 4t + 4) with one 8-byte load; they stand for the logical columns
// {2t, 2t + 1, 2t + 8, 2t + 9} of the m16n8k16 A fragment (register a0 / a2 for row groupID,
// a1 / a3 for groupID + 8).  The resident weights are stored with the same permutation
// (`fwd_perm_col`, applied once when they are loaded), so the sums over K are unchanged.
constexpr int kFwdMaxBlocks = 160;  // forward grid limit (reduce_norms: 4 * 32 + 32 partials)
constexpr int kFwdKPW = 8;  // K steps per warp per pass (their A fragments: 64 registers)

// Physical column, within a 16-wide K step, of logical fragment column kk (0..15).
__host__ __device__ inline int fwd_perm_col(int kk) {
  return 4 * ((kk & 7) >> 1) + (kk & 1) + 2 * (kk >> 3);
}

// Output tiles per pass: 4 n8 tiles for the 4-gate cells (the block's 4 * units gate rows),
// 1 for the RNN cells; slots of one m16 tile in the partial buffer: NT rounded up to that.
__host__ __device__ inline int fwd_ntg(int G) { return G == 4 ? 4 : 1; }
__host__ __device__ inline int fwd_slots_per_mtile(int G, int units) {
  const int NT = (G * units + 7) / 8, ntg = fwd_ntg(G);
  return (NT + ntg - 1) / ntg * ntg;
}

// red[w][lane][reg][slot] (kWarps x 32 x 4 x kAccTiles floats): warp w's fp32 accumulator
// register `reg` of output tile `slot` (= mt * NTp + nt), as the lane holds it.
__device__ __forceinline__ float* fwd_partial(float* red, int w, int lane, int reg, int slot) {
  return red + ((size_t)(w * 32 + lane) * 4 + reg) * kAccTiles + slot;
}

// z[m][n] = sum over the warps (in a fixed order) of their partial tiles: the step product of
// fwd_product_direct for row m < M of the tile and weight row n < N (NTp: fwd_slots_per_mtile).
__device__ __forceinline__ float fwd_z(const float* red, int m, int n, int NTp) {
  const int r = m & 15, c = n & 7;
  const float* p = red + ((size_t)(((r & 7) * 4 + (c >> 1)) * 4 + (r >> 3) * 2 + (c & 1))) *
                             kAccTiles + (m >> 4) * NTp + (n >> 3);
  float z = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) z += p[(size_t)w * 32 * 4 * kAccTiles];
  return z;
}

// Partial products of the M x N output tile: out[m][n] = sum_k X[m][k] W[n][k], X = rows of the
// global exchange buffer (ldx elements apart, input dtype, zero-padded to Kp = xrow(K)), W the
// block's resident rows in shared memory ([N][ld], columns permuted by fwd_perm_col).  The K
// steps are dealt round-robin to the warps; each warp loads the A fragments of all its K steps
// of a pass (kFwdKPW of them, 8-byte L2 loads, all in flight) before its mmas, and leaves its
// partial tiles in `red` (fwd_partial; a __syncthreads is needed before fwd_z reads them).
// NTG n8 tiles per pass (4: the LSTM's 32 gate rows at 8 units, 1: the RNN cells); rows past
// M / N read row M-1 / N-1 and are dropped.  Needs ceil(M / 16) * NTp <= kAccTiles (the plan).
// `while_loading()` runs once, by all threads, right after the first pass's loads are issued.
template <typename T, int NTG, typename Hook>
__device__ __forceinline__ void fwd_product_direct(const T* __restrict__ X, int ldx, int M,
                                                   const T* __restrict__ W, int N, int ld,
                                                   int Kp, float* __restrict__ red,
                                                   Hook&& while_loading) {
  static_assert(NTG == 1 || NTG == 4, "fwd_product_direct: 1 or 4 n8 tiles per pass");
  static_assert(kFwdKPW == 8, "the K-chunk loop below steps by kWarps * 8");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;
  const int MT = (M + 15) / 16, NT = (N + 7) / 8, ksteps = Kp / 16;
  const int ntg = NTG, NTp = (NT + NTG - 1) / NTG * NTG;
  for (int mt0 = 0; mt0 < MT; mt0 += 2) {
    const T* xr[4];  // this lane's 4 rows (2 m16 tiles x {groupID, groupID + 8}), its K columns
#pragma unroll
    for (int q = 0; q < 4; ++q)
      xr[q] = X + (size_t)min(mt0 * 16 + 16 * (q >> 1) + 8 * (q & 1) + gid, M - 1) * ldx +
              16 * warp + 4 * tig;
    for (int nt0 = 0; nt0 < NT; nt0 += ntg) {
      int wo[NTG == 4 ? 2 : 1];  // ldmatrix row offsets: x4 = two n8 tiles, x2 = one
#pragma unroll
      for (int p = 0; p < (NTG == 4 ? 2 : 1); ++p) {
#ifdef RNNREG_PLANT_FRAG
        const int n = (nt0 + 2 * p + (NTG == 4 ? lane >> 4 : 0)) * 8 + (lane & 7) + 1;  // planted
#else
        const int n = (nt0 + 2 * p + (NTG == 4 ? lane >> 4 : 0)) * 8 + (lane & 7);
#endif
        wo[p] = min(n, N - 1) * ld + 8 * ((lane >> 3) & 1) + 16 * warp;
      }
      float acc[2][NTG][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int jj = 0; jj < NTG; ++jj)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][jj][e] = 0.f;
      for (int kc = 0; kc < ksteps; kc += kWarps * 8) {
        uint2 av[kFwdKPW][4];
        const uint2* xq[4];  // this pass's first K step; the others at constant offsets
#pragma unroll
        for (int q = 0; q < 4; ++q) xq[q] = reinterpret_cast<const uint2*>(xr[q] + 16 * kc);
#pragma unroll
        for (int i = 0; i < kFwdKPW; ++i)
          if (kc + warp + kWarps * i < ksteps) {
#pragma unroll
            for (int q = 0; q < 4; ++q) av[i][q] = __ldcg(xq[q] + 4 * kWarps * i);
          }
        if (mt0 == 0 && nt0 == 0 && kc == 0) while_loading();  // work that overlaps the loads
#pragma unroll
        for (int i = 0; i < kFwdKPW; ++i)
          if (kc + warp + kWarps * i < ksteps) {
            const int ko = 16 * (kc + kWarps * i);
            uint32_t bfr[NTG][2];
            if constexpr (NTG == 4) {
#pragma unroll
              for (int p = 0; p < 2; ++p) {
                uint32_t r4[4];
                ldmatrix_x4(r4, W + wo[p] + ko);
                bfr[2 * p][0] = r4[0];
                bfr[2 * p][1] = r4[1];
                bfr[2 * p + 1][0] = r4[2];
                bfr[2 * p + 1][1] = r4[3];
              }
            } else {
              ldmatrix_x2(bfr[0], W + wo[0] + ko);
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
              const uint32_t af[4] = {av[i][2 * mi].x, av[i][2 * mi + 1].x, av[i][2 * mi].y,
                                      av[i][2 * mi + 1].y};
#pragma unroll
              for (int jj = 0; jj < NTG; ++jj) mma_16816<T>(acc[mi][jj], af, bfr[jj]);
            }
          }
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        if (mt0 + mi >= MT) break;
        const int slot = (mt0 + mi) * NTp + nt0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float* dst = fwd_partial(red, warp, lane, e, slot);
          if constexpr (NTG == 4)
            *reinterpret_cast<float4*>(dst) =
                make_float4(acc[mi][0][e], acc[mi][1][e], acc[mi][2][e], acc[mi][3][e]);
          else
            *dst = acc[mi][0][e];
        }
      }
    }
  }
}

// Issues the copies of rows [b0, b0 + nb) of an exchange buffer (rows of `ldg` elements, a
// multiple of 16 bytes) into shared rows of `lds` elements: 16-byte cp.async chunks, every
// chunk of the tile in flight at once.  Complete them with cp_async_wait_all + __syncthreads.
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, int lds, const T* src, int ldg, int b0,
                                           int nb) {
  const int cpr = ldg * (int)sizeof(T) / 16;  // chunks per row
  const int dbl = kThreads / cpr, dc = kThreads - dbl * cpr;  // stride kThreads in (row, chunk)
  const int tid = threadIdx.x;
  const unsigned char* g = reinterpret_cast<const unsigned char*>(src + (size_t)b0 * ldg);
  unsigned char* d = reinterpret_cast<unsigned char*>(dst);
  const size_t srb = (size_t)lds * sizeof(T), grb = (size_t)ldg * sizeof(T);  // row bytes
  // Three shapes of the same copy; the bounds of the two not taken are 0 (so that each loop's
  // header says whether it runs: the static profile reads them).
  // (1) kThreads a multiple of cpr: a fixed chunk per thread, every dbl-th row.
  const int rows_fixed = dc == 0 ? nb : 0;
  // (2) cpr a multiple of kThreads: every row, a fixed set of chunks per thread.
  const int rows_wide = dc != 0 && cpr % kThreads == 0 ? nb : 0;
  // (3) otherwise: chunk index i = tid + n * kThreads over the tile.
  const int chunks_any = dc != 0 && cpr % kThreads != 0 ? nb * cpr : 0;
  if (rows_fixed > 0) {
    const int c = tid - (tid / cpr) * cpr;
    for (int r = tid / cpr; r < rows_fixed; r += dbl)
      cp_async16(d + r * srb + (size_t)c * 16, g + r * grb + (size_t)c * 16);
  }
#pragma unroll 1
  for (int r = 0; r < rows_wide; ++r)
#pragma unroll 1
    for (int cc = tid; cc < cpr; cc += kThreads)
      cp_async16(d + r * srb + (size_t)cc * 16, g + r * grb + (size_t)cc * 16);
  int bl = tid / cpr, c = tid - bl * cpr;
  for (int i = tid; i < chunks_any; i += kThreads) {
    cp_async16(d + bl * srb + (size_t)c * 16, g + bl * grb + (size_t)c * 16);
    bl += dbl;
    c += dc;
    if (c >= cpr) {
      c -= cpr;
      ++bl;
    }
  }
}

// Valid steps of row b (lengths clamped to 1..T so a bad value cannot index out of bounds).
__device__ __forceinline__ int clamp_length(int64_t L, int T) {
  return L < 1 ? 1 : (L > T ? T : (int)L);
}
__device__ __forceinline__ int row_length(const int64_t* lengths, int b, int T) {
  if (lengths == nullptr) return T;
  return clamp_length(lengths[b], T);
}

// Time position of processing step k (1-based) of a row of length L.
__device__ __forceinline__ int position(int k, int L, int reverse) {
  return reverse ? L - k : k - 1;
}

}  // namespace rnnreg

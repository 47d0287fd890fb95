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

// One group of MTG x NTG output tiles (16 x 8 each) from row blocks mt0 / nt0, with KR
// accumulators per tile on interleaved K steps: warp w does K steps w, w + nw, ...; the
// fragments of one K step are all loaded before its MTG * NTG independent mmas.  Writes the
// warp's partial tiles to red[warp][slot][lane][4], slot = r * MTG * NTG + mi * NTG + ni.
template <typename T, int MTG, int NTG, int KR>
__device__ __forceinline__ void mma_group(const T* __restrict__ A, int M, const T* __restrict__ Bm,
                                          int N, int ld, int ksteps, int nw, int mt0, int nt0,
                                          float* __restrict__ red) {
  using F = Frag<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int ao[MTG], ao8[MTG], bo[NTG];
#pragma unroll
  for (int i = 0; i < MTG; ++i) {
    ao[i] = F::a_off((mt0 + i) * 16, M, ld, lane, 0);
    ao8[i] = F::a_off((mt0 + i) * 16, M, ld, lane, 1);
  }
#pragma unroll
  for (int j = 0; j < NTG; ++j) bo[j] = F::b_off((nt0 + j) * 8, N, ld, lane);
  float acc[KR][MTG][NTG][4];
#pragma unroll
  for (int r = 0; r < KR; ++r)
#pragma unroll
    for (int i = 0; i < MTG; ++i)
#pragma unroll
      for (int j = 0; j < NTG; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][i][j][e] = 0.f;
  for (int ks = warp; ks < ksteps; ks += nw * KR) {
#pragma unroll
    for (int r = 0; r < KR; ++r) {
      const int kk = ks + r * nw;
      if (r == 0 || kk < ksteps) {
        const int k0 = kk * F::KS;
        uint32_t af[MTG][4], bf[NTG][2];
#pragma unroll
        for (int i = 0; i < MTG; ++i) F::load_a(af[i], A, ao[i] + k0, ao8[i] + k0);
#pragma unroll
        for (int j = 0; j < NTG; ++j) F::load_b(bf[j], Bm, bo[j] + k0);
#pragma unroll
        for (int i = 0; i < MTG; ++i)
#pragma unroll
          for (int j = 0; j < NTG; ++j) F::mma(acc[r][i][j], af[i], bf[j]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < KR; ++r)
#pragma unroll
    for (int i = 0; i < MTG; ++i)
#pragma unroll
      for (int j = 0; j < NTG; ++j) {
        float4 v;
        v.x = acc[r][i][j][0]; v.y = acc[r][i][j][1]; v.z = acc[r][i][j][2]; v.w = acc[r][i][j][3];
        const int slot = (r * MTG + i) * NTG + j;
        *reinterpret_cast<float4*>(red + ((size_t)(warp * kAccTiles + slot) * 32 + lane) * 4) = v;
      }
}

// out[m * ldo + n] = sum_k A[m][k] * Bm[n][k] for m < M, n < N, on tensor cores with fp32
// accumulation: T = bf16/fp16 -> mma.m16n8k16 (operands through ldmatrix), T = float -> TF32
// mma.m16n8k8 (operands rounded with cvt.rna.tf32, loaded with conflict-free 32-bit LDS).
// A: [M][ld] and Bm: [N][ld] in shared memory, K zero-padded to Kp (a multiple of 16),
// ld = srow(Kp).  A rows are the m16 side, Bm rows the n8 side ("col" B operand = Bm^T); rows
// past M / N read row M-1 / N-1 and their results are dropped.  The output tiles go in groups
// of MTG x NTG <= 2 x 4 (kAccTiles accumulators per warp: the rest of them, KR per tile, run
// interleaved K steps, which shortens the dependent mma chains); the K steps are dealt
// round-robin to the warps, and the partial tiles are added in a fixed order through `red`
// (kMmaRedFloats floats), so the result is deterministic.  Called by all threads; ends with a
// __syncthreads.
template <typename T>
__device__ void block_mma(const T* __restrict__ A, int M, const T* __restrict__ Bm, int N,
                          int ld, int Kp, float* __restrict__ out, int ldo,
                          float* __restrict__ red) {
  const int MT = (M + 15) / 16, NT = (N + 7) / 8;
  const int ksteps = Kp / Frag<T>::KS;
  const int nw = ksteps < kWarps ? ksteps : kWarps;
  const int mtg = MT >= 2 ? 2 : 1, ntg = NT >= 4 ? 4 : (NT >= 2 ? 2 : 1);
  const int kr = kAccTiles / (mtg * ntg);
  for (int mt0 = 0; mt0 < MT; mt0 += mtg) {
    for (int nt0 = 0; nt0 < NT; nt0 += ntg) {
      if ((int)(threadIdx.x / 32) < nw) {
        if (mtg == 2) {
          if (ntg == 4) mma_group<T, 2, 4, 1>(A, M, Bm, N, ld, ksteps, nw, mt0, nt0, red);
          else if (ntg == 2) mma_group<T, 2, 2, 2>(A, M, Bm, N, ld, ksteps, nw, mt0, nt0, red);
          else mma_group<T, 2, 1, 4>(A, M, Bm, N, ld, ksteps, nw, mt0, nt0, red);
        } else {
          if (ntg == 4) mma_group<T, 1, 4, 2>(A, M, Bm, N, ld, ksteps, nw, mt0, nt0, red);
          else if (ntg == 2) mma_group<T, 1, 2, 4>(A, M, Bm, N, ld, ksteps, nw, mt0, nt0, red);
          else mma_group<T, 1, 1, 8>(A, M, Bm, N, ld, ksteps, nw, mt0, nt0, red);
        }
      }
      __syncthreads();
      // One (tile, lane) float4 per thread: the sum over warps and K interleaves, fixed order.
      const int tiles = mtg * ntg;
      for (int idx = threadIdx.x; idx < tiles * 32; idx += kThreads) {
        const int t = idx / 32, l = idx % 32;
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
        const float4* part = reinterpret_cast<const float4*>(red) + t * 32 + l;
        for (int w = 0; w < nw; ++w, part += kAccTiles * 32) {
          const float4* pr = part;
          for (int r = 0; r < kr; ++r, pr += tiles * 32) {
            const float4 v = *pr;
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

// Issues the copies of rows [b0, b0 + nb) of an exchange buffer (rows of `ldg` elements, a
// multiple of 16 bytes) into shared rows of `lds` elements: 16-byte cp.async chunks, every
// chunk of the tile in flight at once.  Complete them with cp_async_wait_all + __syncthreads.
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, int lds, const T* src, int ldg, int b0,
                                           int nb) {
  const int cpr = ldg * (int)sizeof(T) / 16;  // chunks per row
  const int dbl = kThreads / cpr, dc = kThreads - dbl * cpr;  // stride kThreads in (row, chunk)
  int bl = threadIdx.x / cpr, c = threadIdx.x - bl * cpr;
  const unsigned char* g = reinterpret_cast<const unsigned char*>(src + (size_t)b0 * ldg);
  unsigned char* d = reinterpret_cast<unsigned char*>(dst);
  if (dc == 0) {  // kThreads is a multiple of the row's chunks: a fixed chunk, every dbl-th row
    const size_t sstep = (size_t)dbl * lds * sizeof(T), gstep = (size_t)dbl * ldg * sizeof(T);
    unsigned char* dp = d + (size_t)bl * lds * sizeof(T) + (size_t)c * 16;
    const unsigned char* gp = g + (size_t)bl * ldg * sizeof(T) + (size_t)c * 16;
    for (; bl < nb; bl += dbl, dp += sstep, gp += gstep) cp_async16(dp, gp);
    return;
  }
  if (cpr % kThreads == 0) {  // rows of several kThreads chunks: a fixed set of columns
    constexpr int kStep = kThreads * 16;
    for (int r = 0; r < nb; ++r) {
      unsigned char* dp = d + (size_t)r * lds * sizeof(T) + (size_t)threadIdx.x * 16;
      const unsigned char* gp = g + (size_t)r * ldg * sizeof(T) + (size_t)threadIdx.x * 16;
      for (int cc = threadIdx.x; cc < cpr; cc += kThreads, dp += kStep, gp += kStep)
        cp_async16(dp, gp);
    }
    return;
  }
  while (bl < nb) {
    cp_async16(d + ((size_t)bl * lds * sizeof(T) + (size_t)c * 16),
               g + ((size_t)bl * ldg * sizeof(T) + (size_t)c * 16));
    bl += dbl;
    c += dc;
    if (c >= cpr) {
      c -= cpr;
      ++bl;
    }
  }
}

// Valid steps of row b (lengths clamped to 1..T so a bad value cannot index out of bounds).
__device__ __forceinline__ int row_length(const int64_t* lengths, int b, int T) {
  if (lengths == nullptr) return T;
  const int64_t L = lengths[b];
  return L < 1 ? 1 : (L > T ? T : (int)L);
}

// Time position of processing step k (1-based) of a row of length L.
__device__ __forceinline__ int position(int k, int L, int reverse) {
  return reverse ? L - k : k - 1;
}

}  // namespace rnnreg

// Device helpers shared by the forward and backward kernels: dtype conversion, warp sums,
// shared-memory layouts and the block-wide matrix-vector product of one step.
// No torch headers: this compiles with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

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

// Byte offsets into the dynamic shared memory of one block.
//   forward:  w [G*units][Hp] (dtype), a = h tile [bs][Hp], z [bs][G*units], hn [bs][units]
//   backward: w = W^T slice [units][Kp] (dtype), a = dz tile [bs][Kp], z = dh [bs][units]
struct Layout {
  size_t w, a, z, hn, red, total;
};

__host__ __device__ inline Layout fwd_layout(int G, int H, int units, int bs, int esize) {
  const size_t Hp = (size_t)round_up(H, kVec), R = (size_t)G * units;
  Layout l;
  l.w = 0;
  l.a = align16(R * Hp * esize);
  l.z = align16(l.a + (size_t)bs * Hp * 4);
  l.hn = align16(l.z + (size_t)bs * R * 4);
  l.red = align16(l.hn + (size_t)bs * units * 4);
  l.total = align16(l.red + (size_t)kRedFloats * 4);
  return l;
}

__host__ __device__ inline Layout bwd_layout(int G, int H, int units, int bs, int esize) {
  const size_t Kp = (size_t)round_up(G * H, kVec);
  Layout l;
  l.w = 0;
  l.a = align16((size_t)units * Kp * esize);
  l.z = align16(l.a + (size_t)bs * Kp * 4);
  l.hn = l.z + (size_t)bs * units * 4;
  l.red = align16(l.hn);
  l.total = align16(l.red + (size_t)kRedFloats * 4);
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

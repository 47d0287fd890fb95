// CPU emulation of the small part of CUDA that the rnnreg kernels use, so that
// tests/test_cuda_build.py can run forward.cu / backward.cu / plan.cu on a machine without a
// GPU: every CUDA thread is an OS thread; __syncthreads, warp shuffles and grid.sync() are
// std::barrier waits.  Only for tests: slow, and blind to GPU memory-model details (coherence
// of L1, bank conflicts); index math, barriers placement and the algorithm are what it checks.
#pragma once

#include <barrier>
#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };

inline thread_local dim3 threadIdx, blockIdx, gridDim, blockDim;

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrCooperativeLaunch
};

namespace emu {

// The emulated device: SM count and shared memory per block (set by the driver).
inline int g_sms = 4;
inline int g_smem_optin = 227 * 1024;

struct Grid {
  int blocks, threads, warps;
  std::barrier<> grid_bar;
  std::vector<std::unique_ptr<std::barrier<>>> block_bar, warp_bar;
  std::vector<float> lanes;
  std::vector<uint64_t> slots;  // per lane kSlots words: warp-wide exchanges (emu_mma.h)
  std::vector<std::vector<unsigned char>> smem;
  static constexpr int kSlots = 8;
  Grid(int nb, int nt, size_t bytes)
      : blocks(nb), threads(nt), warps(nt / 32), grid_bar(nb * nt),
        lanes((size_t)nb * nt), slots((size_t)nb * nt * kSlots),
        smem(nb, std::vector<unsigned char>(bytes + 16, 0xff)) {
    for (int b = 0; b < nb; ++b) block_bar.emplace_back(new std::barrier<>(nt));
    for (int w = 0; w < nb * warps; ++w) warp_bar.emplace_back(new std::barrier<>(32));
  }
};
inline thread_local Grid* g_grid = nullptr;

inline unsigned char* block_smem() {
  unsigned char* p = g_grid->smem[blockIdx.x].data();
  return p + ((16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15);
}

}  // namespace emu

inline void __syncthreads() { emu::g_grid->block_bar[blockIdx.x]->arrive_and_wait(); }

namespace emu {
// A warp shuffle: every lane publishes v, then reads the value of lane src(lane) (its own v
// when that is out of range, as __shfl_down_sync does); two warp barriers around the read.
template <class Src>
inline float warp_shuffle(float v, Src src) {
  Grid& g = *g_grid;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* slot = g.lanes.data() + (size_t)blockIdx.x * g.threads + warp * 32;
  std::barrier<>& bar = *g.warp_bar[blockIdx.x * g.warps + warp];
  slot[lane] = v;
  bar.arrive_and_wait();
  const unsigned from = src((unsigned)lane);
  const float r = from < 32 ? slot[from] : v;
  bar.arrive_and_wait();
  return r;
}
}  // namespace emu

inline float __shfl_xor_sync(unsigned, float v, int offset) {
  return emu::warp_shuffle(v, [offset](unsigned lane) { return lane ^ (unsigned)offset; });
}

inline float __shfl_down_sync(unsigned, float v, unsigned delta) {
  return emu::warp_shuffle(v, [delta](unsigned lane) { return lane + delta; });
}

template <class V> inline V __ldcg(const V* p) { return *p; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
template <class V> inline void __stcg(V* p, V v) { *p = v; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return 0; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
inline cudaError_t cudaSetDevice(int) { return 0; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu::g_sms
       : a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::g_smem_optin : 1;
  return 0;
}
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int,
                                                                 size_t smem) {
  *n = (int)(emu::g_smem_optin / (smem ? smem : 1));
  return 0;
}
// The driver runs kernels itself (emu::run_grid); a launch through here is an error.
inline cudaError_t cudaLaunchCooperativeKernel(const void*, dim3, dim3, void**, size_t,
                                               cudaStream_t) {
  return 1;
}

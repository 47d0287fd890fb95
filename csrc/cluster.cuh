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
#pragma once

#include <cstdint>

#ifdef RNNREG_EMULATE
#include "emu_cluster.h"
#endif

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

}  // namespace rnnreg

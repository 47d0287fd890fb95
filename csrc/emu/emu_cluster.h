// CPU emulation of thread-block clusters (csrc/cluster.cuh) on top of emu.h: blocks
// [c * size, c * size + size) of the emulated grid form cluster c; a block's rank is
// blockIdx.x % size; barrier.cluster is one std::barrier per cluster (arrive and wait split,
// as in PTX); distributed shared memory is a pointer into the other block's emulated shared
// memory at the same offset.  Every DSMEM access is bounds-checked against the target block's
// allocation and every rank against the cluster size (a violation aborts with a message).
// Like emu.h it is blind to the memory model: it checks index math and barrier placement.
#pragma once

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <vector>

#include "emu.h"

namespace emu {

struct Cluster {
  int size = 1;
  size_t smem_bytes = 0;  // per block (the bounds of DSMEM accesses)
  std::vector<std::unique_ptr<std::barrier<>>> bars;
  Cluster(int blocks, int csize, int threads, size_t bytes) : size(csize), smem_bytes(bytes) {
    for (int c = 0; c < blocks / csize; ++c) bars.emplace_back(new std::barrier<>(csize * threads));
  }
};
inline thread_local Cluster* g_cluster = nullptr;
inline thread_local std::optional<std::barrier<>::arrival_token> g_cluster_token;

[[noreturn]] inline void cluster_fail(const char* what, long long a, long long b) {
  std::fprintf(stderr, "emulated cluster error: %s (%lld, %lld) in block %u thread %u\n", what, a,
               b, blockIdx.x, threadIdx.x);
  std::abort();
}

inline int cluster_rank() { return (int)(blockIdx.x % (unsigned)g_cluster->size); }

inline unsigned char* smem_of(int block) {
  unsigned char* p = g_grid->smem[block].data();
  return p + ((16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15);
}

inline uintptr_t cluster_map(const void* p, int rank) {
  const Cluster& c = *g_cluster;
  if (rank < 0 || rank >= c.size) cluster_fail("mapa: rank outside the cluster", rank, c.size);
  const long long off = reinterpret_cast<const unsigned char*>(p) - smem_of(blockIdx.x);
  if (off < 0 || off >= (long long)c.smem_bytes)
    cluster_fail("mapa: not a shared-memory address of this block", off, (long long)c.smem_bytes);
  const int target = (int)(blockIdx.x / c.size) * c.size + rank;
  return reinterpret_cast<uintptr_t>(smem_of(target) + off);
}

// The target block of a mapped address, and the check that [a, a + n) lies inside it.
inline void cluster_check(uintptr_t a, size_t n) {
  const Cluster& c = *g_cluster;
  const int first = (int)(blockIdx.x / c.size) * c.size;
  for (int b = first; b < first + c.size; ++b) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(smem_of(b));
    if (a >= base && a + n <= base + c.smem_bytes) return;
  }
  cluster_fail("DSMEM access outside the cluster's shared memory", (long long)(a & 0xffff),
               (long long)n);
}

inline void cluster_st16(uintptr_t a, const uint4& v) {
  cluster_check(a, 16);
  if (a % 16) cluster_fail("st.shared::cluster.v4: address not 16-byte aligned", (long long)(a % 16), 16);
  std::memcpy(reinterpret_cast<void*>(a), &v, 16);
}

inline float cluster_ld_f32(uintptr_t a) {
  cluster_check(a, 4);
  float f;
  std::memcpy(&f, reinterpret_cast<const void*>(a), 4);
  return f;
}

inline void cluster_arrive() {
  if (g_cluster_token) cluster_fail("barrier.cluster.arrive twice without a wait", 0, 0);
  g_cluster_token.emplace(g_cluster->bars[blockIdx.x / g_cluster->size]->arrive());
}

inline void cluster_wait() {
  if (!g_cluster_token) cluster_fail("barrier.cluster.wait without an arrive", 0, 0);
  g_cluster->bars[blockIdx.x / g_cluster->size]->wait(std::move(*g_cluster_token));
  g_cluster_token.reset();
}

}  // namespace emu

// The runtime API the cluster planner and launcher use (cluster.cu), emulated.
constexpr cudaFuncAttribute cudaFuncAttributeNonPortableClusterSizeAllowed =
    static_cast<cudaFuncAttribute>(1);
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct { unsigned x, y, z; } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned numAttrs = 0;
};
// Clusters of the configured size that fit at once: SMs / cluster size (one block per SM).
inline cudaError_t cudaOccupancyMaxActiveClusters(int* n, const void*, const cudaLaunchConfig_t* c) {
  unsigned size = 1;
  for (unsigned i = 0; i < c->numAttrs; ++i)
    if (c->attrs[i].id == cudaLaunchAttributeClusterDimension) size = c->attrs[i].val.clusterDim.x;
  *n = c->dynamicSmemBytes > (size_t)emu::g_smem_optin ? 0 : emu::g_sms / (int)size;
  return 0;
}
// The test driver runs kernels itself; a launch through here is an error.
inline cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t*, const void*, void**) { return 1; }

// Warp-level tensor-core and async-copy primitives (inline PTX, sm_80+), and their CPU
// emulation (csrc/emu/emu_mma.h, same fragment layouts) for tests/test_cuda_build.py.
//   ldmatrix_x4 / ldmatrix_x2: ldmatrix.sync.aligned.m8n8.{x4,x2}.shared.b16
//   mma_16816<T>:              mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16} (d += a*b)
//   to_tf32 / mma_1688_tf32:   cvt.rna.tf32.f32, mma.sync.aligned.m16n8k8.row.col.f32.tf32
//   cp_async16 / cp_async_wait_all: cp.async.cg.shared.global 16 bytes (L2 only: the exchange
//                              buffers are written by other blocks of the same launch)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef RNNREG_EMULATE
#include "emu_mma.h"
#endif

namespace rnnreg {

#ifdef RNNREG_EMULATE

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emu::ldmatrix<4>(r, row); }
__device__ inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) { emu::ldmatrix<2>(r, row); }
template <typename T>
__device__ inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::mma_m16n8k16(d, a, b, std::is_same<T, __nv_bfloat16>::value);
}
__device__ inline uint32_t to_tf32(float x) { return emu::f32_to_tf32(x); }
__device__ inline void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4],
                                     const uint32_t (&b)[2]) {
  emu::mma_m16n8k8_tf32(d, a, b);
}
__device__ inline void cp_async16(void* dst, const void* src) { std::memcpy(dst, src, 16); }
__device__ inline void cp_async_wait_all() {}

#else

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row))
               : "memory");
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4],
                                              const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

#endif

}  // namespace rnnreg

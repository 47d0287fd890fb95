// CPU emulation of the warp-level tensor-core and async-copy instructions used by mma.cuh:
// ldmatrix.sync.aligned.m8n8.{x2,x4}.shared.b16, mma.sync.aligned.m16n8k16.row.col.f32.
// {bf16,f16}.{bf16,f16}.f32 and cp.async.cg.shared.global (16 bytes).
//
// The fragment layouts are the ones of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with
// floating point type"; the same maps are CUTLASS's SM80_16x16_Row / SM80_8x16_Row /
// SM80_16x8_Row), with groupID = lane / 4 and tig = lane % 4 (threadID_in_group):
//   A (16x16, row): reg r holds elements (row = groupID + 8*(r & 1), col = 2*tig + 8*(r >> 1) + e)
//   B (16x8, col):  reg r holds elements (k = 2*tig + 8*r + e, n = groupID)
//   C/D (16x8 f32): d[i] is element (row = groupID + 8*(i >> 1), col = 2*tig + (i & 1))
// where e = 0 is the low and e = 1 the high 16 bits of the 32-bit register.
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 ("for .tf32"; CUTLASS's
// SM80_16x8x8_F32TF32TF32F32_TN), one element per register:
//   A (16x8):  a[r] is element (row = groupID + 8*(r & 1), col = tig + 4*(r >> 1))
//   B (8x8):   b[r] is element (k = tig + 4*r, n = groupID);  C/D as above.
// The hardware reads the upper 19 bits (sign, exponent, 10 mantissa bits) of each operand;
// cvt.rna.tf32.f32 rounds to nearest, ties away from zero.
// ldmatrix: lanes 8j..8j+7 give the 8 row addresses (16 bytes each) of matrix j; every lane
// gets, in register j, the 32-bit word at byte offset 4*(lane % 4) of row lane / 4 of matrix j.
//
// Each instruction is one warp-wide exchange: every lane publishes its operands into its
// slots, a warp barrier, every lane computes its own result from the other lanes' slots, a
// second barrier.  tests/test_cuda_build.py checks these maps lane by lane against the table
// above (written out independently in Python) and against a plain matrix product.
#pragma once

#include <cstdint>
#include <cstring>

#include "emu.h"

namespace emu {

inline uint64_t* lane_slots(int lane) {
  Grid& g = *g_grid;
  const int warp = threadIdx.x / 32;
  return g.slots.data() + ((size_t)blockIdx.x * g.threads + warp * 32 + lane) * Grid::kSlots;
}
inline void warp_barrier() {
  Grid& g = *g_grid;
  g.warp_bar[blockIdx.x * g.warps + threadIdx.x / 32]->arrive_and_wait();
}

template <int N>
inline void ldmatrix(uint32_t* r, const void* row_addr) {
  const int lane = threadIdx.x % 32;
  lane_slots(lane)[0] = (uint64_t)(uintptr_t)row_addr;
  warp_barrier();
  for (int j = 0; j < N; ++j) {
    const unsigned char* row =
        reinterpret_cast<const unsigned char*>((uintptr_t)lane_slots(8 * j + lane / 4)[0]);
    std::memcpy(&r[j], row + 4 * (lane % 4), 4);
  }
  warp_barrier();
}

inline float bits_to_float(uint16_t b, bool bf16) {
  if (bf16) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return (float)h;
}

inline uint16_t half_of(uint32_t reg, int e) { return (uint16_t)(e ? reg >> 16 : reg & 0xffffu); }

// d += A * B for one warp (bf16 selects the element type of A and B).
inline void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, bool bf16) {
  const int lane = threadIdx.x % 32;
  uint64_t* mine = lane_slots(lane);
  for (int r = 0; r < 4; ++r) mine[r] = a[r];
  for (int r = 0; r < 2; ++r) mine[4 + r] = b[r];
  warp_barrier();
  const int gid = lane / 4, tig = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int m = gid + 8 * (i >> 1), n = 2 * tig + (i & 1);
    double s = 0.0;  // exact products, one rounding at the end
    for (int k = 0; k < 16; ++k) {
      const int e = k & 1, kt = (k & 7) / 2;
      const uint32_t ar = (uint32_t)lane_slots((m & 7) * 4 + kt)[(m >> 3) + 2 * (k >> 3)];
      const uint32_t br = (uint32_t)lane_slots(n * 4 + kt)[4 + (k >> 3)];
      s += (double)bits_to_float(half_of(ar, e), bf16) * bits_to_float(half_of(br, e), bf16);
    }
    out[i] = (float)((double)d[i] + s);
  }
  warp_barrier();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline uint32_t f32_to_tf32(float x) {  // cvt.rna.tf32.f32
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;  // finite: half an ulp on the magnitude
  return u & 0xffffe000u;
}

inline float tf32_value(uint32_t u) {
  u &= 0xffffe000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// d += A * B, m16n8k8 with tf32 operands.
inline void mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b) {
  const int lane = threadIdx.x % 32;
  uint64_t* mine = lane_slots(lane);
  for (int r = 0; r < 4; ++r) mine[r] = a[r];
  for (int r = 0; r < 2; ++r) mine[4 + r] = b[r];
  warp_barrier();
  const int gid = lane / 4, tig = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int m = gid + 8 * (i >> 1), n = 2 * tig + (i & 1);
    double s = 0.0;
    for (int k = 0; k < 8; ++k) {
      const uint32_t ar = (uint32_t)lane_slots((m & 7) * 4 + (k & 3))[(m >> 3) + 2 * (k >> 2)];
      const uint32_t br = (uint32_t)lane_slots(n * 4 + (k & 3))[4 + (k >> 2)];
      s += (double)tf32_value(ar) * tf32_value(br);
    }
    out[i] = (float)((double)d[i] + s);
  }
  warp_barrier();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace emu

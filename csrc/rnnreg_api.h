// Host-side interface between the torch binding (binding.cpp) and the torch-free CUDA code
// (forward.cu, backward.cu, plan.cu).  Plain C++ and the CUDA runtime only: no torch headers.
//
// Layouts (all contiguous, row-major; "step-indexed" buffers use processing step k-1):
//   x [T, B, G*H], w [G*H, H], h0/c0/mask [B, H] (dtype T), lengths [B] int64 or null;
//   cell_scale [H] (float, normprop only, else null);
//   out [T, B, H], hn/cn [B, H] (dtype T); norms [T+1, B], cnorms [T+1, B] (cells with a cell
//   state, when asked for), terms [3] (float);
//   saved (float, step-indexed): hsave [T, B, H] (half dtypes only), gates [T, B, 4H] and
//   cs [T, B, H] (cells with a cell state).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

namespace rnnreg {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum Cell : int { kLSTM = 0, kReLU = 1, kTanh = 2, kTrec = 3, kNormProp = 4 };

// lstm and normprop: four gates and a cell state (normprop: h = o * tanh(a * c) * h_scale).
__host__ __device__ inline bool has_cell_state(int cell) {
  return cell == kLSTM || cell == kNormProp;
}
inline int gates_of(int cell) { return has_cell_state(cell) ? 4 : 1; }
inline int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }


// How one call is split over the grid: block b owns hidden units [b*units, b*units + units).
struct Plan {
  int units = 0;       // hidden units per block
  int blocks = 0;      // grid size (all co-resident)
  int bs_fwd = 0;      // batch rows staged in shared memory per tile, forward
  int bs_bwd = 0;      // same, backward
  size_t smem_fwd = 0;  // dynamic shared memory per block, bytes
  size_t smem_bwd = 0;
};

// Scalars shared by forward and backward.
struct Scalars {
  int T = 0, B = 0, H = 0, cell = 0;
  float theta = 1.f, w_ns = 0.f, w_tar = 0.f, w_ar = 0.f;
  float heps = 0.f;  // H * ns_eps (added to the sum of squares of a norm)
  float h_scale = 1.f;  // normprop: h = o * tanh(a * c) * h_scale; 1 for every other cell
  int ns_include_initial = 0, reverse = 0;
  int tf32 = 0;   // float32 only: step product on TF32 tensor cores (Spec.allow_tf32), else FFMA
  // test-only planted bug (1 race, 2 out-of-bounds; 3-7 wrong contract-v2 numerics; 8-10 the
  // forward's tile / row / column bookkeeping, for the emulation tests); needs -DRNNREG_PLANT_BUG
  int plant = 0;
};

struct FwdArgs {
  Scalars s;
  Plan plan;
  const void* x = nullptr;
  const void* w = nullptr;
  const void* h0 = nullptr;
  const void* c0 = nullptr;
  const void* mask = nullptr;
  const int64_t* lengths = nullptr;
  const float* cell_scale = nullptr;  // [H] normprop (a), else null (a = 1)
  void* out = nullptr;
  void* hn = nullptr;
  void* cn = nullptr;
  float* norms = nullptr;
  float* cnorms = nullptr;  // [T+1, B] cell norms, or null (not computed)
  float* terms = nullptr;
  float* hsave = nullptr;
  float* gates = nullptr;
  float* cs = nullptr;
  float* scratch = nullptr;  // fwd_scratch_floats(...) floats
};

struct BwdArgs {
  Scalars s;
  Plan plan;
  const void* w = nullptr;
  const void* h0 = nullptr;
  const void* c0 = nullptr;
  const void* mask = nullptr;
  const int64_t* lengths = nullptr;
  const float* cell_scale = nullptr;  // [H] normprop, else null
  const void* out = nullptr;        // forward output [T, B, H]
  const float* norms = nullptr;     // [T+1, B]
  const float* cnorms = nullptr;    // [T+1, B] cell norms (needed with g_cnorms), or null
  const float* hsave = nullptr;     // [T, B, H] or null (then h is read from out)
  const float* gates = nullptr;     // LSTM
  const float* cs = nullptr;        // LSTM
  const void* g_out = nullptr;      // [T, B, H]
  const void* g_hn = nullptr;       // [B, H]
  const void* g_cn = nullptr;       // [B, H] LSTM
  const float* g_terms = nullptr;   // [3]
  const float* g_norms = nullptr;   // [T+1, B] dL/dnorms, or null (zero)
  const float* g_cnorms = nullptr;  // [T+1, B] dL/dcnorms, or null (zero)
  void* gx = nullptr;               // [T, B, G*H] (time positions)
  float* dz = nullptr;              // [T, B, G*H] step-indexed float copy, or null
  void* gh0 = nullptr;              // [B, H]
  void* gc0 = nullptr;              // [B, H] LSTM
  float* gcs = nullptr;             // [H] grad of cell_scale (normprop), or null
  float* scratch = nullptr;         // bwd_scratch_floats(...) floats
};

// Scratch (float32 elements, 16-byte aligned): the double-buffered exchange of h (forward) or
// dz (backward) in the input dtype, rows padded to a multiple of 16 elements, then floats
// (forward: partial sums of squares of h and c [2][B][fwd_part_stride(blocks)] each, block
// sums [blocks][3]; backward: carried dh, dc and the grad_cell_scale partials [B][H] each).
inline size_t round16_(int K) { return (size_t)(K + 15) / 16 * 16; }
// The forward's partial rows are padded to fwd_part_stride(blocks) floats (16-byte loads).
__host__ __device__ inline int fwd_part_stride(int blocks) { return (blocks + 3) / 4 * 4; }
inline size_t fwd_scratch_floats(int B, int H, int blocks) {
  return 2 * (size_t)B * round16_(H) + 4 * (size_t)B * fwd_part_stride(blocks) +
         3 * (size_t)blocks + 4;
}
inline size_t bwd_scratch_floats(int B, int H, int G) {
  return 2 * (size_t)B * round16_(G * H) + 3 * (size_t)B * H + 4;
}

// Chooses the split for (cell, dtype, B, H) on `device` and checks that the grid of both
// kernels is co-resident.  units_override > 0 forces the units per block (tests, tuning).
// Returns "" on success, else a message saying why it does not fit and which H fit.
std::string make_plan(int cell, int dtype, int B, int H, int device, int units_override,
                      Plan* plan);

// The largest H for which make_plan succeeds with the default split (0 if none).
int max_hidden(int cell, int dtype, int B, int device);

// One cooperative launch each, on `stream`.  Return "" on success, else the error text.
std::string launch_forward(int dtype, const FwdArgs& a, cudaStream_t stream);
std::string launch_backward(int dtype, const BwdArgs& a, cudaStream_t stream);

// Kernel entry points as `const void*` for occupancy queries (defined with the kernels): the
// instantiation for `cell` (one for the 4-gate cells lstm / normprop, one for relu / tanh / trec).
const void* forward_kernel_ptr(int dtype, int cell);
const void* backward_kernel_ptr(int dtype, int cell);

}  // namespace rnnreg

// Test-only driver (tests/test_cuda_build.py): runs the kernels of forward.cu / backward.cu and
// the planner of plan.cu on the CPU emulation of emu.h, behind a small C interface for ctypes.
// Build: g++ -std=c++20 -O1 -pthread -shared -fPIC -DRNNREG_EMULATE -DRNNREG_THREADS=64
//        -Icsrc/emu -Icsrc csrc/emu/emu_driver.cpp -o libemu.so
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "../backward.cu"
#include "../forward.cu"
#include "../plan.cu"

namespace {

thread_local std::string g_err;

template <class Args>
void run_grid(void (*kernel)(Args), const Args& a, int blocks, size_t smem) {
  emu::Grid grid(blocks, rnnreg::kThreads, smem);
  std::vector<std::thread> threads;
  threads.reserve((size_t)blocks * rnnreg::kThreads);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < rnnreg::kThreads; ++t)
      threads.emplace_back([&grid, &a, kernel, b, t, blocks] {
        emu::g_grid = &grid;
        blockIdx = dim3(b);
        threadIdx = dim3(t);
        gridDim = dim3(blocks);
        blockDim = dim3(rnnreg::kThreads);
        kernel(a);
      });
  for (auto& th : threads) th.join();
}

// iargs: T, B, H, cell, ns_include_initial, reverse, units, sms, dtype, tf32, plant
// fargs: theta, w_ns, w_tar, w_ar, heps, h_scale
rnnreg::Scalars scalars(const int* ia, const float* fa) {
  rnnreg::Scalars s;
  s.T = ia[0];
  s.B = ia[1];
  s.H = ia[2];
  s.cell = ia[3];
  s.ns_include_initial = ia[4];
  s.reverse = ia[5];
  s.tf32 = ia[9];
  s.plant = ia[10];
  s.theta = fa[0];
  s.w_ns = fa[1];
  s.w_tar = fa[2];
  s.w_ar = fa[3];
  s.heps = fa[4];
  s.h_scale = fa[5];
  return s;
}

bool plan_for(const int* ia, rnnreg::Plan* p) {
  emu::g_sms = ia[7];
  g_err = rnnreg::make_plan(ia[3], ia[8], ia[1], ia[2], 0, ia[6], p);
  return g_err.empty();
}

// One warp runs one emulated ldmatrix.x4 and one mma.m16n8k16 on operands given lane by lane
// (tests/test_cuda_build.py checks them against the PTX fragment tables).
struct FragArgs {
  int bf16 = 0;  // 1 bf16, 0 fp16, -1 tf32 (m16n8k8, no ldmatrix)
  const uint16_t* mat = nullptr;  // 32 rows of 8 elements: row r of matrix r / 8
  uint32_t* ld_regs = nullptr;    // [32][4] ldmatrix.x4 result per lane
  const uint32_t* a = nullptr;    // [32][4] A fragment per lane
  const uint32_t* b = nullptr;    // [32][2] B fragment per lane
  const float* c = nullptr;       // [32][4]
  float* d = nullptr;             // [32][4]
};

void frag_kernel(FragArgs f) {
  if (threadIdx.x >= 32) return;  // one warp
  const int lane = threadIdx.x;
  if (f.bf16 < 0) {
    uint32_t a[4], b[2];
    float d[4];
    for (int j = 0; j < 4; ++j) a[j] = f.a[4 * lane + j], d[j] = f.c[4 * lane + j];
    for (int j = 0; j < 2; ++j) b[j] = f.b[2 * lane + j];
    rnnreg::mma_1688_tf32(d, a, b);
    for (int j = 0; j < 4; ++j) f.d[4 * lane + j] = d[j];
    return;
  }
  uint32_t r[4];
  rnnreg::ldmatrix_x4(r, f.mat + 8 * lane);  // lane l gives the address of row l
  for (int j = 0; j < 4; ++j) f.ld_regs[4 * lane + j] = r[j];
  uint32_t a[4], b[2];
  float d[4];
  for (int j = 0; j < 4; ++j) a[j] = f.a[4 * lane + j], d[j] = f.c[4 * lane + j];
  for (int j = 0; j < 2; ++j) b[j] = f.b[2 * lane + j];
  if (f.bf16) rnnreg::mma_16816<__nv_bfloat16>(d, a, b);
  else rnnreg::mma_16816<__half>(d, a, b);
  for (int j = 0; j < 4; ++j) f.d[4 * lane + j] = d[j];
}

// The dtype dispatch of one cell instantiation (Gated: lstm / normprop; else relu / tanh / trec).
template <bool Gated>
void run_forward(int dtype, const rnnreg::FwdArgs& a) {
  if (dtype == rnnreg::kBFloat16)
    run_grid(&rnnreg::forward_kernel<__nv_bfloat16, Gated>, a, a.plan.blocks, a.plan.smem_fwd);
  else if (dtype == rnnreg::kFloat16)
    run_grid(&rnnreg::forward_kernel<__half, Gated>, a, a.plan.blocks, a.plan.smem_fwd);
  else
    run_grid(&rnnreg::forward_kernel<float, Gated>, a, a.plan.blocks, a.plan.smem_fwd);
}

template <bool Gated>
void run_backward(int dtype, const rnnreg::BwdArgs& a) {
  if (dtype == rnnreg::kBFloat16)
    run_grid(&rnnreg::backward_kernel<__nv_bfloat16, Gated>, a, a.plan.blocks, a.plan.smem_bwd);
  else if (dtype == rnnreg::kFloat16)
    run_grid(&rnnreg::backward_kernel<__half, Gated>, a, a.plan.blocks, a.plan.smem_bwd);
  else
    run_grid(&rnnreg::backward_kernel<float, Gated>, a, a.plan.blocks, a.plan.smem_bwd);
}

}  // namespace

extern "C" {

unsigned emu_to_tf32(float x) { return rnnreg::to_tf32(x); }

void emu_fragments(int bf16, const uint16_t* mat, uint32_t* ld_regs, const uint32_t* a,
                   const uint32_t* b, const float* c, float* d) {
  FragArgs f;
  f.bf16 = bf16; f.mat = mat; f.ld_regs = ld_regs; f.a = a; f.b = b; f.c = c; f.d = d;
  run_grid(&frag_kernel, f, 1, 0);
}


// ptrs: x, w, h0, c0, mask, lengths, out, hn, cn, norms, terms, hsave, gates, cs, cell_scale,
//       cnorms (the last two null when absent)
const char* emu_forward(const int* ia, const float* fa, void** p) {
  rnnreg::FwdArgs a;
  a.s = scalars(ia, fa);
  if (!plan_for(ia, &a.plan)) return g_err.c_str();
  std::vector<float> scratch(rnnreg::fwd_scratch_floats(a.s.B, a.s.H, a.plan.blocks),
                             std::numeric_limits<float>::quiet_NaN());
  a.x = p[0]; a.w = p[1]; a.h0 = p[2]; a.c0 = p[3]; a.mask = p[4];
  a.lengths = static_cast<const int64_t*>(p[5]);
  a.out = p[6]; a.hn = p[7]; a.cn = p[8];
  a.norms = static_cast<float*>(p[9]);
  a.terms = static_cast<float*>(p[10]);
  a.hsave = static_cast<float*>(p[11]);
  a.gates = static_cast<float*>(p[12]);
  a.cs = static_cast<float*>(p[13]);
  a.cell_scale = static_cast<const float*>(p[14]);
  a.cnorms = static_cast<float*>(p[15]);
  a.scratch = scratch.data();
  const int dtype = ia[8];
  // the instantiation the CUDA launch picks (forward_kernel_ptr): 4-gate cells or RNN cells
  if (rnnreg::has_cell_state(a.s.cell))
    run_forward<true>(dtype, a);
  else
    run_forward<false>(dtype, a);
  return "";
}

// ptrs: w, h0, c0, mask, lengths, out, norms, hsave, gates, cs, g_out, g_hn, g_cn, g_terms,
//       gx, dz, gh0, gc0, cell_scale, cnorms, g_norms, g_cnorms, gcs (null when absent)
const char* emu_backward(const int* ia, const float* fa, void** p) {
  rnnreg::BwdArgs a;
  a.s = scalars(ia, fa);
  if (!plan_for(ia, &a.plan)) return g_err.c_str();
  const int G = rnnreg::gates_of(a.s.cell);
  std::vector<float> scratch(rnnreg::bwd_scratch_floats(a.s.B, a.s.H, G),
                             std::numeric_limits<float>::quiet_NaN());
  a.w = p[0]; a.h0 = p[1]; a.c0 = p[2]; a.mask = p[3];
  a.lengths = static_cast<const int64_t*>(p[4]);
  a.out = p[5];
  a.norms = static_cast<const float*>(p[6]);
  a.hsave = static_cast<const float*>(p[7]);
  a.gates = static_cast<const float*>(p[8]);
  a.cs = static_cast<const float*>(p[9]);
  a.g_out = p[10]; a.g_hn = p[11]; a.g_cn = p[12];
  a.g_terms = static_cast<const float*>(p[13]);
  a.gx = p[14];
  a.dz = static_cast<float*>(p[15]);
  a.gh0 = p[16]; a.gc0 = p[17];
  a.cell_scale = static_cast<const float*>(p[18]);
  a.cnorms = static_cast<const float*>(p[19]);
  a.g_norms = static_cast<const float*>(p[20]);
  a.g_cnorms = static_cast<const float*>(p[21]);
  a.gcs = static_cast<float*>(p[22]);
  a.scratch = scratch.data();
  const int dtype = ia[8];
  if (rnnreg::has_cell_state(a.s.cell))  // as backward_kernel_ptr
    run_backward<true>(dtype, a);
  else
    run_backward<false>(dtype, a);
  return "";
}

// The plan for (cell, dtype, B, H) with `units` forced (0 = default) on an emulated device of
// `sms` SMs and `smem_optin` bytes per block; out = units, blocks, bs_fwd, bs_bwd.
const char* emu_plan(int cell, int dtype, int B, int H, int units, int sms, int smem_optin,
                     int* out) {
  emu::g_sms = sms;
  emu::g_smem_optin = smem_optin;
  rnnreg::Plan p;
  g_err = rnnreg::make_plan(cell, dtype, B, H, 0, units, &p);
  out[0] = p.units; out[1] = p.blocks; out[2] = p.bs_fwd; out[3] = p.bs_bwd;
  return g_err.c_str();
}

int emu_max_hidden(int cell, int dtype, int sms, int smem_optin) {
  emu::g_sms = sms;
  emu::g_smem_optin = smem_optin;
  return rnnreg::max_hidden(cell, dtype, 1, 0);
}

}  // extern "C"

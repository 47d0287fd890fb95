// Test-only driver of the cluster variant (tests/test_cuda_cluster.py): everything of
// emu_driver.cpp (the persistent kernels) plus the cluster forward of cluster.cu and the
// cluster backward of cluster_backward.cu, run on the CPU emulation of clusters
// (emu_cluster.h).
// Build: g++ -std=c++20 -O1 -pthread -shared -fPIC -DRNNREG_EMULATE -DRNNREG_THREADS=64
//        -Icsrc/emu -Icsrc csrc/emu/emu_cluster_driver.cpp -o libemu_cluster.so
#include "emu_driver.cpp"

#include "../cluster.cu"
#include "../cluster_backward.cu"

namespace {

template <class Args>
void run_cluster_grid(void (*kernel)(Args), const Args& a, int blocks, int csize, size_t smem) {
  emu::Grid grid(blocks, rnnreg::kThreads, smem);
  emu::Cluster cluster(blocks, csize, rnnreg::kThreads, smem);
  std::vector<std::thread> threads;
  threads.reserve((size_t)blocks * rnnreg::kThreads);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < rnnreg::kThreads; ++t)
      threads.emplace_back([&grid, &cluster, &a, kernel, b, t, blocks] {
        emu::g_grid = &grid;
        emu::g_cluster = &cluster;
        blockIdx = dim3(b);
        threadIdx = dim3(t);
        gridDim = dim3(blocks);
        blockDim = dim3(rnnreg::kThreads);
        kernel(a);
      });
  for (auto& th : threads) th.join();
}

template <int NTG, bool Gated>
void run_cell(int dtype, const rnnreg::ClusterFwdArgs& a) {
  const int blocks = a.plan.csize * a.plan.clusters;
  if (dtype == rnnreg::kBFloat16)
    run_cluster_grid(&rnnreg::cluster_forward_kernel<__nv_bfloat16, NTG, Gated>, a, blocks,
                     a.plan.csize, a.plan.smem);
  else if (dtype == rnnreg::kFloat16)
    run_cluster_grid(&rnnreg::cluster_forward_kernel<__half, NTG, Gated>, a, blocks,
                     a.plan.csize, a.plan.smem);
  else
    run_cluster_grid(&rnnreg::cluster_forward_kernel<float, NTG, Gated>, a, blocks,
                     a.plan.csize, a.plan.smem);
}

// The instantiation the CUDA launch picks (cluster_forward_kernel_ptr): lstm or the RNN cells.
template <int NTG>
void run(int dtype, const rnnreg::ClusterFwdArgs& a) {
  if (a.s.cell == rnnreg::kLSTM)
    run_cell<NTG, true>(dtype, a);
  else
    run_cell<NTG, false>(dtype, a);
}

template <int NTG, bool Gated>
void run_bwd_cell(int dtype, const rnnreg::ClusterBwdArgs& a) {
  const int blocks = a.plan.csize * a.plan.clusters;
  if (dtype == rnnreg::kBFloat16)
    run_cluster_grid(&rnnreg::cluster_backward_kernel<__nv_bfloat16, NTG, Gated>, a, blocks,
                     a.plan.csize, a.plan.smem);
  else if (dtype == rnnreg::kFloat16)
    run_cluster_grid(&rnnreg::cluster_backward_kernel<__half, NTG, Gated>, a, blocks,
                     a.plan.csize, a.plan.smem);
  else
    run_cluster_grid(&rnnreg::cluster_backward_kernel<float, NTG, Gated>, a, blocks,
                     a.plan.csize, a.plan.smem);
}

// The instantiation the CUDA launch picks (cluster_backward_kernel_ptr).
template <int NTG>
void run_bwd(int dtype, const rnnreg::ClusterBwdArgs& a) {
  if (a.s.cell == rnnreg::kLSTM)
    run_bwd_cell<NTG, true>(dtype, a);
  else
    run_bwd_cell<NTG, false>(dtype, a);
}

}  // namespace

extern "C" {

// out = units, csize, clusters, bs, smem (bytes)
const char* emu_cluster_plan(int cell, int dtype, int B, int H, int units, int csize_max, int sms,
                             int smem_optin, long long* out) {
  emu::g_sms = sms;
  emu::g_smem_optin = smem_optin;
  rnnreg::ClusterPlan p;
  g_err = rnnreg::make_cluster_plan(cell, dtype, B, H, 0, units, csize_max, &p);
  out[0] = p.units; out[1] = p.csize; out[2] = p.clusters; out[3] = p.bs;
  out[4] = (long long)p.smem;
  return g_err.c_str();
}

int emu_cluster_max_hidden(int cell, int dtype, int B, int csize_max, int sms, int smem_optin) {
  emu::g_sms = sms;
  emu::g_smem_optin = smem_optin;
  return rnnreg::cluster_max_hidden(cell, dtype, B, 0, csize_max);
}

// iargs: T, B, H, cell, ns_include_initial, reverse, units, sms, dtype, tf32, csize_max, plant
//        (plant: the planted error of a -DRNNREG_PLANT_CLUSTER build, 1 forward, 2 backward)
// fargs: theta, w_ns, w_tar, w_ar, heps, (unused)
// ptrs: x, w, h0, c0, mask, lengths, out, hn, cn, norms, sums, hsave, gates, cs
// (sums: 3 * csize * clusters floats of the plan emu_cluster_plan returns)
const char* emu_cluster_forward(const int* ia, const float* fa, void** p) {
  rnnreg::ClusterFwdArgs a;
  a.s = scalars(ia, fa);
  a.s.plant = ia[11];
  emu::g_sms = ia[7];
  g_err = rnnreg::make_cluster_plan(a.s.cell, ia[8], a.s.B, a.s.H, 0, ia[6], ia[10], &a.plan);
  if (!g_err.empty()) return g_err.c_str();
  a.x = p[0]; a.w = p[1]; a.h0 = p[2]; a.c0 = p[3]; a.mask = p[4];
  a.lengths = static_cast<const int64_t*>(p[5]);
  a.out = p[6]; a.hn = p[7]; a.cn = p[8];
  a.norms = static_cast<float*>(p[9]);
  a.sums = static_cast<float*>(p[10]);
  a.hsave = static_cast<float*>(p[11]);
  a.gates = static_cast<float*>(p[12]);
  a.cs = static_cast<float*>(p[13]);
  if (rnnreg::cluster_ntg(a.plan.bs) == 2) run<2>(ia[8], a);
  else run<1>(ia[8], a);
  return "";
}

// The backward's plan, as emu_cluster_plan.
const char* emu_cluster_bwd_plan(int cell, int dtype, int B, int H, int units, int csize_max,
                                 int sms, int smem_optin, long long* out) {
  emu::g_sms = sms;
  emu::g_smem_optin = smem_optin;
  rnnreg::ClusterPlan p;
  g_err = rnnreg::make_cluster_bwd_plan(cell, dtype, B, H, 0, units, csize_max, &p);
  out[0] = p.units; out[1] = p.csize; out[2] = p.clusters; out[3] = p.bs;
  out[4] = (long long)p.smem;
  return g_err.c_str();
}

int emu_cluster_bwd_max_hidden(int cell, int dtype, int B, int csize_max, int sms,
                               int smem_optin) {
  emu::g_sms = sms;
  emu::g_smem_optin = smem_optin;
  return rnnreg::cluster_bwd_max_hidden(cell, dtype, B, 0, csize_max);
}

// iargs, fargs as emu_cluster_forward
// ptrs: w, h0, c0, mask, lengths, out, norms, hsave, gates, cs, g_out, g_hn, g_cn, g_terms,
//       g_norms, gx, dz, gh0, gc0 (null when absent)
const char* emu_cluster_backward(const int* ia, const float* fa, void** p) {
  rnnreg::ClusterBwdArgs a;
  a.s = scalars(ia, fa);
  a.s.plant = ia[11];
  emu::g_sms = ia[7];
  g_err = rnnreg::make_cluster_bwd_plan(a.s.cell, ia[8], a.s.B, a.s.H, 0, ia[6], ia[10],
                                        &a.plan);
  if (!g_err.empty()) return g_err.c_str();
  a.w = p[0]; a.h0 = p[1]; a.c0 = p[2]; a.mask = p[3];
  a.lengths = static_cast<const int64_t*>(p[4]);
  a.out = p[5];
  a.norms = static_cast<const float*>(p[6]);
  a.hsave = static_cast<const float*>(p[7]);
  a.gates = static_cast<const float*>(p[8]);
  a.cs = static_cast<const float*>(p[9]);
  a.g_out = p[10]; a.g_hn = p[11]; a.g_cn = p[12];
  a.g_terms = static_cast<const float*>(p[13]);
  a.g_norms = static_cast<const float*>(p[14]);
  a.gx = p[15];
  a.dz = static_cast<float*>(p[16]);
  a.gh0 = p[17]; a.gc0 = p[18];
  if (a.plan.bs > 8) run_bwd<2>(ia[8], a);
  else run_bwd<1>(ia[8], a);
  return "";
}

}  // extern "C"

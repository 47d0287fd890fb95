// Backward of the recurrence on Hopper thread-block clusters (sm_90; the opt-in cluster
// variant, see docs/cuda.md "Cluster variant"): one launch, steps k = T..1, no grid barrier.
//
// Cluster c runs batch rows [c*bs, c*bs + bs); its CTA of rank r owns hidden units
// [r*units, r*units + nu).  The recurrent gradient of those units is
//   dh_{k}[b][j] += sum_r dz_{k+1}[b][r] * w_hh[r][j]   over all G*H gate rows r,
// so a CTA keeps the columns j of w_hh it owns, for every gate row: the W^T slice
// wt[jl][g*Hp + i] = w_hh[g*H + i][j0 + jl] ([units][srow(G*Hp)], input dtype), resident for
// the whole sequence (the whole w_hh is resident in the cluster).  Gate g's entries sit in a
// segment of Hp = csize * units columns (zero past H), so every CTA's slice of a gate starts on
// a 16-byte boundary whatever H is.
//
// Every CTA holds a double-buffered copy of the cluster's whole dz ([bs][srow(G*Hp)], input
// dtype; fp32 stays fp32).  Per step k a CTA waits for dz_{k+1} (barrier.cluster.wait), runs
// the step product dz_{k+1} W^T-slice on tensor cores (cluster_product of cluster.cuh: its W^T
// rows as the m16 side, the few batch rows as the n8 side), adds the upstream gradient, the
// penalty gradients (prefetched before the wait) and the carried gradient, runs the cell
// backward of its items, and pushes its slice of dz_k (16-byte st.shared::cluster stores) into
// the other buffer of every CTA of the cluster; then barrier.cluster.arrive.release.  Between
// the arrive and the next wait, off the critical path: the step's global stores (grad_x_proj
// and the fp32 dz copy, staged in shared memory by the cell update) and the prefetch of step
// k-1's inputs (upstream gradient, saved states / gates, norms) for the thread's first item.
// After the loop: grad_h0 = dz_1 W (+ the norm-stabilizer and grad_norms terms of n_0),
// grad_c0.  No float atomics, no cross-CTA sums other than the product's fixed-order K split:
// the result is deterministic.  grad_w_hh is one GEMM on the host side afterwards (cuda.py's
// _grad_w_hh, as for the persistent backward).
#include "cluster.cuh"

namespace rnnreg {

// Gate segment length of the gathered dz rows: the cluster's units, a multiple of 8.
__host__ __device__ inline int cl_bwd_hp(int H, int units) {
  return (H + units - 1) / units * units;
}

// Byte offsets into a CTA's dynamic shared memory (backward).
//   w  [units][ld] (dtype): the W^T slice, ld = srow(G*Hp)
//   dx [2][bs][ld] (dtype): the cluster's dz_{k+1} (written by every CTA)
//   dl [bs][G][units] (dtype): this CTA's slice of dz_k (pushed to the cluster)
//   df [bs][G][units] (fp32): the same in fp32, for the global stores after the arrive
//   dh [bs][units] (fp32): the step product; hc, cc [bs][units]: carried dL/dh, dL/dc
//   red (kClusterRedFloats): the product's K-part scratch
struct ClusterBwdLayout {
  size_t w, dx, dl, df, dh, hc, cc, red, total;
};

__host__ __device__ inline ClusterBwdLayout cluster_bwd_layout(int G, int H, int units, int bs,
                                                               int es) {
  const size_t ld = (size_t)srow(G * cl_bwd_hp(H, units), es), u = (size_t)units;
  ClusterBwdLayout l;
  l.w = 0;
  l.dx = align16(u * ld * es);
  l.dl = align16(l.dx + 2 * (size_t)bs * ld * es);
  l.df = align16(l.dl + (size_t)bs * G * u * es);
  l.dh = align16(l.df + (size_t)bs * G * u * 4);
  l.hc = align16(l.dh + (size_t)bs * u * 4);
  l.cc = align16(l.hc + (size_t)bs * u * 4);
  l.red = align16(l.cc + (G == 4 ? (size_t)bs * u * 4 : 0));
  l.total = align16(l.red + (size_t)kClusterRedFloats * 4);
  return l;
}

// Everything of item (b, j) at step k that does not depend on dz_{k+1}: the gradient reaching
// h_k from outside the recurrence (grad_output + the penalties' gradients + the grad_norms
// radial term) and the cell's local derivatives.
//   LSTM: dc = dc_carry + kc * dh;  dz_g = kd[g] * dc (g < 3), dz_o = kd[3] * dh;
//         dc_carry(k-1) = fg * dc.   RNN cells: dz = kd[0] * dh.
struct ClBwdIn {
  float gin;    // gradient into h_k besides the carry and the recurrence (0 when frozen)
  float kd[4];  // local derivatives
  float kc;     // LSTM: o * (1 - tanh(c_k)^2)
  float fg;     // LSTM: forget gate
  int pos;      // time position of step k, -1 past the row's length (frozen step)
};

// h_kk (1 <= kk <= L) of row b, unit j in fp32: the saved fp32 states (bf16/fp16), else the
// fp32 output at the step's position.
template <typename T>
__device__ __forceinline__ float cl_state(const ClusterBwdArgs& a, int kk, int L, int b, int j) {
  const int B = a.s.B, H = a.s.H;
  if (a.hsave) return a.hsave[((size_t)(kk - 1) * B + b) * H + j];
  return to_f(static_cast<const T*>(a.out)[((size_t)position(kk, L, a.s.reverse) * B + b) * H + j]);
}

template <typename T, bool Gated>
__device__ __forceinline__ ClBwdIn cl_bwd_inputs(const ClusterBwdArgs& a, int k, int b, int j,
                                                 float cns, float ctar, float car) {
  const Scalars& s = a.s;
  const int B = s.B, H = s.H;
  const int L = row_length(a.lengths, b, s.T);
  ClBwdIn in;
  in.gin = 0.f;
  in.kc = 0.f;
  in.fg = 0.f;
#pragma unroll
  for (int g = 0; g < 4; ++g) in.kd[g] = 0.f;
  in.pos = -1;
  if (k > L) return in;
  in.pos = position(k, L, s.reverse);
  const float hk = cl_state<T>(a, k, L, b, j);
  float g = to_f(static_cast<const T*>(a.g_out)[((size_t)in.pos * B + b) * H + j]);
  // norm-stabilizer and grad_norms: a coefficient times h_k / n_k
  if (cns != 0.f || a.g_norms) {
    const float nk = a.norms[(size_t)k * B + b];
    float coef = a.g_norms ? a.g_norms[(size_t)k * B + b] : 0.f;
    if (cns != 0.f) {
      const float back = (k >= 2 || s.ns_include_initial)
                             ? nk - a.norms[(size_t)(k - 1) * B + b] : 0.f;
      const float fwd = k < L ? a.norms[(size_t)(k + 1) * B + b] - nk : 0.f;
      coef += cns * (back - fwd);
    }
    if (nk > 0.f) g += coef * (hk / nk);
  }
  // TAR: (h_k - h_{k-1})^2 for 2 <= k <= L
  if (ctar != 0.f) {
    if (k >= 2) g += ctar * (hk - cl_state<T>(a, k - 1, L, b, j));
    if (k < L) g += ctar * (hk - cl_state<T>(a, k + 1, L, b, j));
  }
  // AR: (m * h_k)^2
  if (car != 0.f) {
    const float m = a.mask ? to_f(static_cast<const T*>(a.mask)[(size_t)b * H + j]) : 1.f;
    g += car * (m * m) * hk;
  }
  in.gin = g;
  if (Gated) {
    const float* gr = a.gates + ((size_t)(k - 1) * B + b) * (size_t)(4 * H) + j;
    const float ig = gr[0], fg = gr[H], gg = gr[2 * H], og = gr[3 * H];
    const size_t si = ((size_t)(k - 1) * B + b) * H + j;
    const float ck = a.cs[si];
    const float cp = k >= 2 ? a.cs[si - (size_t)B * H]
                            : to_f(static_cast<const T*>(a.c0)[(size_t)b * H + j]);
    const float tc = tanhf(ck);
    in.kc = og * (1.f - tc * tc);
    in.kd[0] = gg * ig * (1.f - ig);
    in.kd[1] = cp * fg * (1.f - fg);
    in.kd[2] = ig * (1.f - gg * gg);
    in.kd[3] = tc * og * (1.f - og);
    in.fg = fg;
  } else if (s.cell == kTanh) {
    in.kd[0] = 1.f - hk * hk;
  } else {  // relu, trec: the unit passed z on (h != 0)
    in.kd[0] = hk != 0.f ? 1.f : 0.f;
  }
  return in;
}

// Gated: lstm; else relu, tanh, trec (the activation picked at run time), as the forward.
template <typename T, int NTG, bool Gated>
__global__ void __launch_bounds__(kThreads, 1) cluster_backward_kernel(ClusterBwdArgs a) {
#if defined(RNNREG_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  const Scalars& s = a.s;
  const int T_ = s.T, B = s.B, H = s.H;
  constexpr int G = Gated ? 4 : 1;
  const int es = (int)sizeof(T);
  const int u = a.plan.units, C = a.plan.csize, bs = a.plan.bs;
  const int rank = cluster_rank(), cid = blockIdx.x / C;
  const int j0 = rank * u, nu = min(u, H - j0);
  const int cb0 = cid * bs, nbv = min(bs, B - cb0);
  const int Hp = C * u, Kx = xrow(G * Hp), ld = srow(G * Hp, es);
  const int E = 16 / es, cpn = (nu + E - 1) / E;  // elements per 16-byte chunk, chunks per gate
  const int tid = threadIdx.x;
  const int items = nbv * nu;
  // The push of dz slices: chunk i = tid + n * kThreads of (rank, row bl*G + g, chunk), walked
  // with carries instead of divisions.
  const int rows = nbv * G, per_rank = rows * cpn;
  const int p_dc = kThreads % cpn, p_drg = (kThreads / cpn) % rows, p_ddst = kThreads / per_rank;
  const int p_c0 = tid % cpn, p_rg0 = (tid / cpn) % rows, p_dst0 = tid / per_rank;

  unsigned char* smem = dynamic_smem();
  const ClusterBwdLayout lay = cluster_bwd_layout(G, H, u, bs, es);
  T* wt = reinterpret_cast<T*>(smem + lay.w);
  T* dx = reinterpret_cast<T*>(smem + lay.dx);
  T* dl = reinterpret_cast<T*>(smem + lay.dl);
  float* df = reinterpret_cast<float*>(smem + lay.df);
  float* dhs = reinterpret_cast<float*>(smem + lay.dh);
  float* hc = reinterpret_cast<float*>(smem + lay.hc);
  float* cc = reinterpret_cast<float*>(smem + lay.cc);
  float* red = reinterpret_cast<float*>(smem + lay.red);

  const T* w = static_cast<const T*>(a.w);
  T* gx = static_cast<T*>(a.gx);

  // W^T slice: wt[jl][g*Hp + i] = w[g*H + i][j0 + jl] (zero past H, past nu and in the
  // row padding), read along jl (coalesced).
  for (int idx = tid; idx < u * ld; idx += kThreads) {
    const int jl = idx % u, col = idx / u, g = col / Hp, i = col % Hp;
    T v = from_f<T>(0.f);
    if (jl < nu && g < G && i < H) v = w[(size_t)(g * H + i) * H + j0 + jl];
    wt[(size_t)jl * ld + col] = v;
  }
  // Both dz copies are zero (padding columns stay zero), the local slice too (its entries
  // past nu are pushed as zeros).
  for (int idx = tid; idx < 2 * bs * ld; idx += kThreads) dx[idx] = from_f<T>(0.f);
  for (int idx = tid; idx < bs * G * u; idx += kThreads) dl[idx] = from_f<T>(0.f);
  // Carries start from the gradients of h_n / c_n.
  for (int q = tid; q < items; q += kThreads) {
    const int bl = q / nu, jl = q % nu;
    const size_t o = (size_t)(cb0 + bl) * H + j0 + jl;
    hc[bl * u + jl] = to_f(static_cast<const T*>(a.g_hn)[o]);
    if (Gated) cc[bl * u + jl] = to_f(static_cast<const T*>(a.g_cn)[o]);
  }
  const float cns = 2.f * s.w_ns * a.g_terms[0];
  const float ctar = 2.f * s.w_tar * a.g_terms[1];
  const float car = 2.f * s.w_ar * a.g_terms[2];
  ClBwdIn first{};
  if (tid < items) first = cl_bwd_inputs<T, Gated>(a, T_, cb0 + tid / nu, j0 + tid % nu, cns,
                                                   ctar, car);
  cluster_sync();  // every CTA's buffers are initialized before anyone writes into them

  for (int k = T_; k >= 1; --k) {
    const bool rec = k < T_;
    if (rec) {
      cluster_wait();  // dz_{k+1} of the whole cluster is in dx[(k+1) & 1]
      const T* dnext = dx + (size_t)((k + 1) & 1) * bs * ld;
      cluster_product<T, NTG>(dnext, nbv, wt, u, ld, Kx, s.tf32 != 0, dhs, u, red);
    }
    #pragma unroll 1
    for (int q = tid; q < items; q += kThreads) {
      const int bl = q / nu, jl = q % nu;
      const ClBwdIn in = q == tid ? first
                                  : cl_bwd_inputs<T, Gated>(a, k, cb0 + bl, j0 + jl, cns, ctar,
                                                            car);
      const int o = bl * u + jl;
      const float dh = hc[o] + in.gin + (rec ? dhs[o] : 0.f);
      float dz[4] = {0.f, 0.f, 0.f, 0.f};
      if (in.pos < 0) {
        hc[o] = dh;  // frozen step: the gradients pass through (dc too)
      } else {
        if (Gated) {
          const float dc = cc[o] + in.kc * dh;
          dz[0] = in.kd[0] * dc;
          dz[1] = in.kd[1] * dc;
          dz[2] = in.kd[2] * dc;
          dz[3] = in.kd[3] * dh;
          cc[o] = in.fg * dc;
        } else {
          dz[0] = in.kd[0] * dh;
        }
        hc[o] = 0.f;
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        dl[(bl * G + g) * u + jl] = from_f<T>(dz[g]);
        df[(bl * G + g) * u + jl] = dz[g];
      }
    }
    __syncthreads();
    // Publish dz_k: this CTA's slice into dx[k & 1] of every CTA of the cluster.
    T* dcur = dx + (size_t)(k & 1) * bs * ld;
    int c = p_c0, rg = p_rg0, dst = p_dst0;  // chunk i = (dst * rows + rg) * cpn + c
#pragma unroll 1
    for (int i = tid; i < C * per_rank; i += kThreads) {
      const int bl = rg / G, g = rg - bl * G;
#ifdef RNNREG_PLANT_CLUSTER
      if (dst != rank || s.plant != 2)  // planted (2): the CTA's own dz copy misses its slice
#endif
      cluster_st16(cluster_map(dcur + (size_t)bl * ld + g * Hp + j0 + c * E, dst),
                   *reinterpret_cast<const uint4*>(dl + (size_t)rg * u + c * E));
      c += p_dc;
      if (c >= cpn) {
        c -= cpn;
        ++rg;
      }
      rg += p_drg;
      if (rg >= rows) {
        rg -= rows;
        ++dst;
      }
      dst += p_ddst;
    }
    cluster_arrive();

    // Off the critical path (until the next wait): the step's global stores ...
    #pragma unroll 1
    for (int q = tid; q < items; q += kThreads) {
      const int bl = q / nu, jl = q % nu, b = cb0 + bl, j = j0 + jl;
      const int L = row_length(a.lengths, b, T_);
      // frozen steps write zeros at position k-1 (never reached by the row)
      const int pos = k <= L ? position(k, L, s.reverse) : k - 1;
      T* gr = gx + ((size_t)pos * B + b) * (size_t)(G * H) + j;
      float* dzr = a.dz ? a.dz + ((size_t)(k - 1) * B + b) * (size_t)(G * H) + j : nullptr;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float v = df[(bl * G + g) * u + jl];
        gr[(size_t)g * H] = from_f<T>(v);
        if (dzr) dzr[(size_t)g * H] = v;
      }
    }
    // ... and the inputs of step k-1 for this thread's first item.
    if (tid < items && k > 1)
      first = cl_bwd_inputs<T, Gated>(a, k - 1, cb0 + tid / nu, j0 + tid % nu, cns, ctar, car);
  }
  cluster_wait();  // dz_1 of the whole cluster is in dx[1]
  cluster_product<T, NTG>(dx + (size_t)bs * ld, nbv, wt, u, ld, Kx, s.tf32 != 0, dhs, u, red);
  // grad_h0 = carry + dz_1 W + the radial terms of n_0 (norm-stabilizer with
  // ns_include_initial, grad_norms[0]); grad_c0 = the carried dc.
  #pragma unroll 1
  for (int q = tid; q < items; q += kThreads) {
    const int bl = q / nu, jl = q % nu, b = cb0 + bl;
    const size_t o = (size_t)b * H + j0 + jl;
    float g = hc[bl * u + jl] + dhs[bl * u + jl];
    const bool ns0 = cns != 0.f && s.ns_include_initial;
    if (ns0 || a.g_norms) {
      const float n0 = a.norms[b];
      float coef = a.g_norms ? a.g_norms[b] : 0.f;
      if (ns0) coef -= cns * (a.norms[(size_t)B + b] - n0);
      if (n0 > 0.f) g += coef * (to_f(static_cast<const T*>(a.h0)[o]) / n0);
    }
    static_cast<T*>(a.gh0)[o] = from_f<T>(g);
    if (Gated) static_cast<T*>(a.gc0)[o] = from_f<T>(cc[bl * u + jl]);
  }
  // No CTA writes into another's shared memory after its last arrive, and every CTA passed
  // the wait above only after all of them arrived: leaving now is safe.
#endif
}

template <int NTG, bool Gated>
const void* cluster_bwd_kernel_ptr(int dtype) {
  if (dtype == kBFloat16)
    return reinterpret_cast<const void*>(&cluster_backward_kernel<__nv_bfloat16, NTG, Gated>);
  if (dtype == kFloat16)
    return reinterpret_cast<const void*>(&cluster_backward_kernel<__half, NTG, Gated>);
  return reinterpret_cast<const void*>(&cluster_backward_kernel<float, NTG, Gated>);
}

const void* cluster_backward_kernel_ptr(int dtype, int bs, int cell) {
  const bool two = bs > 8;  // n8 tiles of batch rows per pass, as cluster_ntg
  if (cell == kLSTM)
    return two ? cluster_bwd_kernel_ptr<2, true>(dtype) : cluster_bwd_kernel_ptr<1, true>(dtype);
  return two ? cluster_bwd_kernel_ptr<2, false>(dtype) : cluster_bwd_kernel_ptr<1, false>(dtype);
}

namespace {

size_t cluster_bwd_bytes(int G, int H, int units, int bs, int es) {
  return cluster_bwd_layout(G, H, units, bs, es).total;
}
const ClusterPlanKind kClusterBwd = {"the cluster variant's backward", &cluster_bwd_bytes,
                                     &cluster_backward_kernel_ptr};

}  // namespace

std::string make_cluster_bwd_plan(int cell, int dtype, int B, int H, int device,
                                  int units_override, int csize_max, ClusterPlan* plan) {
  return cluster_plan_or_why(kClusterBwd, cell, dtype, B, H, device, units_override, csize_max,
                             plan);
}

int cluster_bwd_max_hidden(int cell, int dtype, int B, int device, int csize_max) {
  return cluster_search_max_hidden(kClusterBwd, cell, dtype, B, device, csize_max);
}

std::string launch_cluster_backward(int dtype, const ClusterBwdArgs& args, cudaStream_t stream) {
  const void* fn = cluster_backward_kernel_ptr(dtype, args.plan.bs, args.s.cell);
  cudaError_t e = cluster_set_attributes(fn, args.plan);
  if (e != cudaSuccess)
    return std::string("rnnreg cluster backward: cudaFuncSetAttribute failed: ") +
           cudaGetErrorString(e);
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = cluster_config(args.plan, attr, stream);
  ClusterBwdArgs copy = args;
  void* params[] = {&copy};
  e = cudaLaunchKernelExC(&cfg, fn, params);
  if (e != cudaSuccess)
    return "rnnreg cluster backward: launch of " + std::to_string(args.plan.clusters) +
           " clusters of " + std::to_string(args.plan.csize) + " CTAs failed: " +
           cudaGetErrorString(e);
  return "";
}

}  // namespace rnnreg

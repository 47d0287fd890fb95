// Backward of the recurrence: one persistent cooperative launch, steps k = T..1.
//
// Block `blk` owns hidden units [blk*units, blk*units + nu) and keeps the matching columns of
// w_hh (W^T rows, all G*H entries each) in shared memory.  Per step it stages dz_{k+1} (input
// dtype, double-buffered global exchange buffer, 16-byte cp.async chunks all in flight) for a
// tile of batch rows, computes its slice of the recurrent gradient dz_{k+1} W (tensor cores for
// bf16/fp16: the staged dz rows are the m16 side, the block's W^T rows the n8 side), adds the
// upstream gradient and the penalty gradients (DESIGN.md section 2, from the saved norms), runs
// the cell backward and publishes its slice of dz_k.  Every block needs all G*H entries of
// dz_{k+1} for its units (the reduction runs over all gate rows), so each block stages the
// whole dz of its batch tiles: in bf16/fp16 that is half the bytes of the fp32 exchange.
// grad_w_hh is one GEMM on the host side afterwards (binding / cuda.py), from the fp32 dz copy.
// The gradients of the norms outputs (grad_norms / grad_cell_norms, contract.py) enter as radial
// terms: g_norms[k] joins the norm-stabilizer's coefficient of h_k / n_k, g_cnorms[k] adds
// g_cnorms[k] * c_k / m_k to dc_k.  normprop (h = o * tanh(a * c) * h_scale) also sums
// grad_cell_scale per (b, unit) over the steps and then over b, in a fixed order.
#include <cooperative_groups.h>

#include "common.cuh"

namespace rnnreg {
namespace cg = cooperative_groups;

// h after processing step kk (1 <= kk <= L) of row b, unit i, in fp32.
template <typename T>
__device__ __forceinline__ float load_h(const BwdArgs& a, int kk, int L, int b, int i) {
  const int B = a.s.B, H = a.s.H;
  if (a.hsave) return a.hsave[((size_t)(kk - 1) * B + b) * H + i];
  const T* out = static_cast<const T*>(a.out);
  return to_f(out[((size_t)position(kk, L, a.s.reverse) * B + b) * H + i]);
}

// dPenalty/dh_k for row b, unit i at valid step k (1 <= k <= L), hk = h_k, plus the radial
// term of grad_norms (both are a coefficient times h_k / n_k).
template <typename T>
__device__ __forceinline__ float penalty_grad(const BwdArgs& a, int k, int L, int b, int i,
                                              float hk, float cns, float ctar, float car) {
  const Scalars& s = a.s;
  const int B = s.B;
  float g = 0.f;
  if (cns != 0.f || a.g_norms) {
    const float nk = a.norms[(size_t)k * B + b];
    float coef = a.g_norms ? a.g_norms[(size_t)k * B + b] : 0.f;
#ifdef RNNREG_PLANT_BUG
    if (s.plant == 7 && a.g_norms) coef = a.g_norms[(size_t)(k - 1) * B + b];  // planted
#endif
    if (cns != 0.f) {
      const float dk = (k >= 2 || s.ns_include_initial) ? nk - a.norms[(size_t)(k - 1) * B + b]
                                                        : 0.f;
      const float dn = k + 1 <= L ? a.norms[(size_t)(k + 1) * B + b] - nk : 0.f;
      coef += cns * (dk - dn);
    }
    if (nk > 0.f) g += coef * hk / nk;
  }
  if (ctar != 0.f) {
    if (k >= 2) g += ctar * (hk - load_h<T>(a, k - 1, L, b, i));
    if (k + 1 <= L) g -= ctar * (load_h<T>(a, k + 1, L, b, i) - hk);
  }
  if (car != 0.f) {
    const T* mask = static_cast<const T*>(a.mask);
    const float m = mask ? to_f(mask[(size_t)b * s.H + i]) : 1.f;
    g += car * m * m * hk;
  }
  return g;
}

// Stage dz rows [b0, b0+nb) of `dz` ([B][Kx], input dtype) into shared memory and compute
// dh[bl][il] = sum_r W[r][j0+il] dz[b0+bl][r] for the block's units.
template <typename T>
__device__ __forceinline__ void recurrent_grad(const T* wt, int nu, int units, const T* dz,
                                               int b0, int nb, int Kx, int ld, bool tf32,
                                               T* dzs, float* dhs, float* red) {
  stage_rows<T>(dzs, ld, dz, Kx, b0, nb);
  cp_async_wait_all();
  __syncthreads();
  step_product<T>(dzs, nb, wt, nu, ld, Kx, tf32, dhs, units, red);
}

// Everything of one (b, i) cell update of step k that does not depend on dz_{k+1}: the
// gradient reaching h_k from outside the recurrence and the cell's local derivatives.  Computed
// for a thread's first item while the dz copies are in flight, so that its global-memory
// latency stays off the step's critical path.
struct CellGrad {
  float dh;     // carried dL/dh (+ grad_output + penalty gradient on valid steps)
  float kz[4];  // LSTM: dz[g] = kz[g] * dc (g < 3), dz[3] = kz[3] * dh; else dz[0] = kz[0] * dh
  float kc;     // LSTM: dc = dc0 + kc * dh
  float dc0;    // LSTM: carried dL/dc (+ the radial term of grad_cell_norms)
  float fg;     // LSTM: forget gate (carries dc to step k-1)
  float ka;     // normprop: grad_cell_scale contribution = ka * dh
  int pos;      // time position of step k, or -1 when the step is frozen (k > L)
};

template <typename T, bool Gated>
__device__ __forceinline__ CellGrad cell_grad(const BwdArgs& a, int k, int b, int i,
                                              const float* dhacc, const float* dcacc, float cns,
                                              float ctar, float car) {
  const Scalars& s = a.s;
  const int B = s.B, H = s.H, GH = (Gated ? 4 : 1) * H;
  const int L = row_length(a.lengths, b, s.T);
  const size_t o = (size_t)b * H + i;
  CellGrad g;
  g.dh = dhacc[o];
#pragma unroll
  for (int j = 0; j < 4; ++j) g.kz[j] = 0.f;
  g.kc = g.dc0 = g.fg = g.ka = 0.f;
  g.pos = -1;
  if (k > L) return g;
  g.pos = position(k, L, s.reverse);
  const float hk = load_h<T>(a, k, L, b, i);
  g.dh += to_f(static_cast<const T*>(a.g_out)[((size_t)g.pos * B + b) * H + i]);
  g.dh += penalty_grad<T>(a, k, L, b, i, hk, cns, ctar, car);
  if (Gated) {
    const float* gs = a.gates + ((size_t)(k - 1) * B + b) * GH;
    const float ig = gs[i], fg = gs[H + i], gg = gs[2 * H + i], og = gs[3 * H + i];
    const size_t cidx = ((size_t)(k - 1) * B + b) * H + i;
    const float cp = k >= 2 ? a.cs[cidx - (size_t)B * H]
                            : to_f(static_cast<const T*>(a.c0)[o]);
    const float ck = a.cs[cidx];
    const float ca = a.cell_scale ? a.cell_scale[i] : 1.f;  // lstm: a = 1, h_scale = 1
    const float tc = tanhf(ca * ck), os = og * s.h_scale, dtc = 1.f - tc * tc;
    g.kc = os * ca * dtc;
    g.ka = os * dtc * ck;
    g.kz[0] = gg * ig * (1.f - ig);
    g.kz[1] = cp * fg * (1.f - fg);
    g.kz[2] = ig * (1.f - gg * gg);
    g.kz[3] = tc * s.h_scale * og * (1.f - og);
    g.dc0 = dcacc[o];
    if (a.g_cnorms) {  // radial term of the cell norm m_k
      const float gm = a.g_cnorms[(size_t)k * B + b];
      float mk = a.cnorms[(size_t)k * B + b];
#ifdef RNNREG_PLANT_BUG
      if (s.plant == 5) mk = a.cnorms[(size_t)(k - 1) * B + b];  // planted: m_{k-1}
#endif
      if (mk > 0.f) g.dc0 += gm * ck / mk;
    }
    g.fg = fg;
  } else if (s.cell == kTanh) {
    g.kz[0] = 1.f - hk * hk;
  } else {
    g.kz[0] = hk != 0.f ? 1.f : 0.f;
  }
  return g;
}

// Gated: lstm and normprop; else relu, tanh, trec (as forward_kernel).
template <typename T, bool Gated>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(BwdArgs a) {
  cg::grid_group grid = cg::this_grid();
  const Scalars& s = a.s;
  const int T_ = s.T, B = s.B, H = s.H;
  constexpr bool lstm = Gated;
  const int G = lstm ? 4 : 1, GH = G * H;
  const int units = a.plan.units, bs = a.plan.bs_bwd;
  const int Kx = xrow(GH), ld = srow(GH, (int)sizeof(T));
  const int blk = blockIdx.x;
  const int j0 = blk * units, nu = min(units, H - j0);
  const int tid = threadIdx.x;

  unsigned char* smem = dynamic_smem();
  const Layout lay = bwd_layout(G, H, units, bs, (int)sizeof(T));
  T* wt = reinterpret_cast<T*>(smem + lay.w);
  T* dzs = reinterpret_cast<T*>(smem + lay.a);
  float* dhs = reinterpret_cast<float*>(smem + lay.z);
  float* red = reinterpret_cast<float*>(smem + lay.red);

  const T* w = static_cast<const T*>(a.w);
  const T* h0 = static_cast<const T*>(a.h0);
  const T* g_hn = static_cast<const T*>(a.g_hn);
  const T* g_cn = static_cast<const T*>(a.g_cn);
  T* gx = static_cast<T*>(a.gx);
  T* dzbuf = reinterpret_cast<T*>(a.scratch);       // [2][B][Kx] dz exchange, input dtype
  float* dhacc = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(a.scratch) +
                                          align16(2 * (size_t)B * Kx * sizeof(T)));  // [B][H]
  float* dcacc = dhacc + (size_t)B * H;              // [B][H] carried dL/dc
  float* gacc = dcacc + (size_t)B * H;               // [B][H] grad_cell_scale partials

  // W^T slice: wt[il][r] = w[r][j0 + il].
  for (int idx = tid; idx < units * ld; idx += kThreads) {
    const int il = idx % units, r = idx / units;
    T v = from_f<T>(0.f);
    if (il < nu && r < GH) v = w[(size_t)r * H + j0 + il];
    wt[(size_t)il * ld + r] = v;
  }
  // The exchange rows' padding columns [GH, Kx) are zero in both buffers (never rewritten;
  // the first read is after a grid.sync).
  if (blk == 0)
    for (int idx = tid; idx < 2 * B * (Kx - GH); idx += kThreads)
      dzbuf[(size_t)(idx / (Kx - GH)) * Kx + GH + idx % (Kx - GH)] = from_f<T>(0.f);
  const float cns = 2.f * s.w_ns * a.g_terms[0];
  const float ctar = 2.f * s.w_tar * a.g_terms[1];
  const float car = 2.f * s.w_ar * a.g_terms[2];

  // Carries start from the gradients of h_n / c_n (same thread <-> (b, i) map as the steps).
  for (int b0 = 0; b0 < B; b0 += bs) {
    const int nb = min(bs, B - b0);
    for (int q = tid; q < nb * nu; q += kThreads) {
      const size_t o = (size_t)(b0 + q / nu) * H + j0 + q % nu;
      dhacc[o] = to_f(g_hn[o]);
      if (lstm) dcacc[o] = to_f(g_cn[o]);
      if (a.gcs) gacc[o] = 0.f;
    }
  }

  for (int k = T_; k >= 1; --k) {
    const T* dz_next = dzbuf + (size_t)((k + 1) & 1) * B * Kx;
    T* dz_cur = dzbuf + (size_t)(k & 1) * B * Kx;
    for (int b0 = 0; b0 < B; b0 += bs) {
      const int nb = min(bs, B - b0);
      const bool rec = k < T_;
      if (rec) stage_rows<T>(dzs, ld, dz_next, Kx, b0, nb);
      CellGrad first{};  // this thread's first item, while the copies are in flight
      if (tid < nb * nu)
        first = cell_grad<T, Gated>(a, k, b0 + tid / nu, j0 + tid % nu, dhacc, dcacc, cns,
                                    ctar, car);
      if (rec) {
        cp_async_wait_all();
        __syncthreads();
        step_product<T>(dzs, nb, wt, nu, ld, Kx, s.tf32 != 0, dhs, units, red);
      }
      for (int q = tid; q < nb * nu; q += kThreads) {
        const int bl = q / nu, il = q % nu, b = b0 + bl, i = j0 + il;
        const size_t o = (size_t)b * H + i;
        const CellGrad cgr =
            q == tid ? first : cell_grad<T, Gated>(a, k, b, i, dhacc, dcacc, cns, ctar, car);
        const float dh = cgr.dh + (rec ? dhs[bl * units + il] : 0.f);
        const size_t zstep = ((size_t)(k - 1) * B + b) * GH + i;  // step-indexed [T, B, GH]
        if (cgr.pos < 0) {  // frozen step: the gradient passes through unchanged
          dhacc[o] = dh;
#pragma unroll
          for (int g = 0; g < 4; ++g) {
            if (g >= G) break;
            gx[zstep + (size_t)g * H] = from_f<T>(0.f);  // position k-1, never reached
            if (a.dz) a.dz[zstep + (size_t)g * H] = 0.f;
            __stcg(dz_cur + (size_t)b * Kx + g * H + i, from_f<T>(0.f));
          }
          continue;
        }
        const int pos = cgr.pos;
        float dz[4];
        if (lstm) {
          const float dc = cgr.dc0 + cgr.kc * dh;
          if (a.gcs) gacc[o] += cgr.ka * dh;
          dz[0] = cgr.kz[0] * dc;
          dz[1] = cgr.kz[1] * dc;
          dz[2] = cgr.kz[2] * dc;
          dz[3] = cgr.kz[3] * dh;
          dcacc[o] = dc * cgr.fg;
        } else {
          dz[0] = cgr.kz[0] * dh;
        }
        const size_t zpos = ((size_t)pos * B + b) * GH + i;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          if (g >= G) break;
          gx[zpos + (size_t)g * H] = from_f<T>(dz[g]);
          if (a.dz) a.dz[zstep + (size_t)g * H] = dz[g];
          __stcg(dz_cur + (size_t)b * Kx + g * H + i, from_f<T>(dz[g]));
        }
        dhacc[o] = 0.f;
      }
      __syncthreads();
    }
    grid.sync();
  }

  // grad_h0 = dz_1 W (+ carry of rows whose grad passed through) + NS term of h0; grad_c0.
  T* gh0 = static_cast<T*>(a.gh0);
  T* gc0 = static_cast<T*>(a.gc0);
  const T* dz_first = dzbuf + (size_t)(1 & 1) * B * Kx;
  for (int b0 = 0; b0 < B; b0 += bs) {
    const int nb = min(bs, B - b0);
    recurrent_grad<T>(wt, nu, units, dz_first, b0, nb, Kx, ld, s.tf32 != 0, dzs, dhs, red);
    for (int q = tid; q < nb * nu; q += kThreads) {
      const int bl = q / nu, il = q % nu, b = b0 + bl;
      const size_t o = (size_t)b * H + j0 + il;
      float g = dhacc[o] + dhs[bl * units + il];
      if ((cns != 0.f && s.ns_include_initial) || a.g_norms) {  // radial terms of n_0
        const float n0 = a.norms[b];
        float coef = a.g_norms ? a.g_norms[b] : 0.f;
        if (cns != 0.f && s.ns_include_initial) coef -= cns * (a.norms[(size_t)B + b] - n0);
        if (n0 > 0.f) g += coef * to_f(h0[o]) / n0;
      }
      gh0[o] = from_f<T>(g);
      if (lstm) {
        float gc = dcacc[o];
        if (a.g_cnorms) {  // radial term of m_0
          const float m0 = a.cnorms[b];
          if (m0 > 0.f) gc += a.g_cnorms[b] * to_f(static_cast<const T*>(a.c0)[o]) / m0;
        }
        gc0[o] = from_f<T>(gc);
      }
    }
    __syncthreads();
  }
  // grad_cell_scale of this block's units: the per-(b, unit) sums over the steps, summed over
  // b in a fixed order (written by this block's threads; visible after the __syncthreads).
  if (a.gcs)
    for (int il = tid; il < nu; il += kThreads) {
      float t = 0.f;
      for (int b = 0; b < B; ++b) t += gacc[(size_t)b * H + j0 + il];
#ifdef RNNREG_PLANT_BUG
      if (s.plant == 4) t -= gacc[(size_t)(B - 1) * H + j0 + il];  // planted: last row lost
#endif
      a.gcs[j0 + il] = t;
    }
}

template <bool Gated>
static const void* backward_kernel_ptr_(int dtype) {
  if (dtype == kBFloat16)
    return reinterpret_cast<const void*>(&backward_kernel<__nv_bfloat16, Gated>);
  if (dtype == kFloat16) return reinterpret_cast<const void*>(&backward_kernel<__half, Gated>);
  return reinterpret_cast<const void*>(&backward_kernel<float, Gated>);
}

const void* backward_kernel_ptr(int dtype, int cell) {
  return has_cell_state(cell) ? backward_kernel_ptr_<true>(dtype)
                              : backward_kernel_ptr_<false>(dtype);
}

std::string launch_backward(int dtype, const BwdArgs& args, cudaStream_t stream) {
  const void* fn = backward_kernel_ptr(dtype, args.s.cell);
  cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)args.plan.smem_bwd);
  if (e != cudaSuccess)
    return std::string("rnnreg backward: cudaFuncSetAttribute failed: ") + cudaGetErrorString(e);
  BwdArgs copy = args;
  void* params[] = {&copy};
  e = cudaLaunchCooperativeKernel(fn, dim3(args.plan.blocks), dim3(kThreads), params,
                                  args.plan.smem_bwd, stream);
  if (e != cudaSuccess)
    return std::string("rnnreg backward: cooperative launch of ") +
           std::to_string(args.plan.blocks) + " blocks failed: " + cudaGetErrorString(e);
  return "";
}

}  // namespace rnnreg

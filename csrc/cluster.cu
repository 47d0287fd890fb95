// Forward of the recurrence on Hopper thread-block clusters (sm_90; opt-in variant, see
// docs/cuda.md "Cluster variant"): one launch, no grid barrier.
//
// Cluster c runs batch rows [c*bs, c*bs + bs) on its own; its CTA of rank r owns hidden units
// [r*units, r*units + nu) and keeps their G*units rows of w_hh in shared memory, so the whole
// w_hh is resident in the cluster.  Every CTA holds a double-buffered copy of the cluster's
// full h_{k-1} ([bs][srow(H)], input dtype) in its shared memory.  Per step a CTA runs the
// tensor-core step product (cluster_product: mma.sync through mma.cuh, the weights as the m16
// side, the few batch rows as the n8 side) on that copy, applies the cell, and pushes its slice
// of h_k (16-byte st.shared::cluster stores) into the other buffer of every CTA of the cluster;
// then barrier.cluster (arrive.release ... wait.acquire) replaces the grid barrier.  Between
// the arrive and the wait, off the step's critical path: the step's global stores (output,
// saved states, gates), the norm of step k-1 (partial sums of squares read from every CTA
// through distributed shared memory, fixed order), and the prefetch of x_{k+1}.  The fp32
// state h_{k-1} and c_{k-1} of a thread's items stay in its CTA's shared memory, so the step
// reads only x and the AR mask from global memory.  NS / TAR / AR sums are reduced and
// weighted per CTA (fixed order); the binding adds the per-CTA terms (one small torch sum).
#include "cluster.cuh"

namespace rnnreg {

// Byte offsets into a CTA's dynamic shared memory.
//   w [G*units][ld] (dtype), hx [2][bs][ld] (dtype: the cluster's h, written by every CTA),
//   z [bs][G*units], hl [bs][units] (dtype: this CTA's slice of h_k, pushed to the cluster),
//   hf [bs][units] (fp32 h), cf [bs][units] (fp32 c, LSTM), gs [bs][4][units] (LSTM gates),
//   sq [3][bs] (partial sums of squares, read by the cluster), red (kClusterRedFloats).
struct ClusterLayout {
  size_t w, hx, z, hl, hf, cf, gs, sq, red, total;
};

__host__ __device__ inline ClusterLayout cluster_layout(int G, int H, int units, int bs, int es) {
  const size_t ld = (size_t)srow(H, es), R = (size_t)G * units, u = (size_t)units;
  ClusterLayout l;
  l.w = 0;
  l.hx = align16(R * ld * es);
  l.z = align16(l.hx + 2 * (size_t)bs * ld * es);
  l.hl = align16(l.z + (size_t)bs * R * 4);
  l.hf = align16(l.hl + (size_t)bs * u * es);
  l.cf = align16(l.hf + (size_t)bs * u * 4);
  l.gs = align16(l.cf + (G == 4 ? (size_t)bs * u * 4 : 0));
  l.sq = align16(l.gs + (G == 4 ? (size_t)bs * 4 * u * 4 : 0));
  l.red = align16(l.sq + 3 * (size_t)bs * 4);
  l.total = align16(l.red + (size_t)kClusterRedFloats * 4);
  return l;
}

// x_k of the G gates and the AR mask for item (b, j) at step k (zeros past the row's length).
struct ClusterIn {
  float x[4];
  float m;
};

template <typename T, bool Gated>
__device__ __forceinline__ ClusterIn cluster_inputs(const ClusterFwdArgs& a, int k, int b, int j) {
  const Scalars& s = a.s;
  const int B = s.B, H = s.H, G = Gated ? 4 : 1;
  ClusterIn in;
#pragma unroll
  for (int g = 0; g < 4; ++g) in.x[g] = 0.f;
  in.m = 1.f;
  const int L = row_length(a.lengths, b, s.T);
  if (k > s.T || k > L) return in;
  if (a.mask && s.w_ar != 0.f) in.m = to_f(static_cast<const T*>(a.mask)[(size_t)b * H + j]);
  const T* xr = static_cast<const T*>(a.x) +
                ((size_t)position(k, L, s.reverse) * B + b) * (size_t)(G * H);
#pragma unroll
  for (int g = 0; g < 4; ++g)
    if (g < G) in.x[g] = to_f(xr[(size_t)g * H + j]);
  return in;
}

// Gated: lstm; else relu, tanh, trec (the activation picked at run time).  The host picks
// the instantiation by cell, so each kernel carries only its cells' update code.
template <typename T, int NTG, bool Gated>
__global__ void __launch_bounds__(kThreads, 1) cluster_forward_kernel(ClusterFwdArgs a) {
#if defined(RNNREG_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  const Scalars& s = a.s;
  const int T_ = s.T, B = s.B, H = s.H, cell = s.cell;
  const int G = Gated ? 4 : 1, GH = G * H, es = (int)sizeof(T);
  const int u = a.plan.units, C = a.plan.csize, bs = a.plan.bs;
  const int rank = cluster_rank(), cid = blockIdx.x / C;
  const int j0 = rank * u, nu = min(u, H - j0);
  const int cb0 = cid * bs, nbv = min(bs, B - cb0);
  const int Hx = xrow(H), ld = srow(H, es), R = G * u;
  const int E = 16 / es, cpn = (nu + E - 1) / E;  // elements per 16-byte chunk, chunks per row
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int items = nbv * nu;
  // The push of h slices: chunk i = tid + n * kThreads of (rank, row, 16-byte chunk), walked
  // with carries instead of divisions.
  const int per_rank = nbv * cpn;
  const int p_dc = kThreads % cpn, p_dbl = (kThreads / cpn) % nbv, p_ddst = kThreads / per_rank;
  const int p_c0 = tid % cpn, p_bl0 = (tid / cpn) % nbv, p_dst0 = tid / per_rank;

  unsigned char* smem = dynamic_smem();
  const ClusterLayout lay = cluster_layout(G, H, u, bs, es);
  T* ws = reinterpret_cast<T*>(smem + lay.w);
  T* hx = reinterpret_cast<T*>(smem + lay.hx);
  float* zs = reinterpret_cast<float*>(smem + lay.z);
  T* hl = reinterpret_cast<T*>(smem + lay.hl);
  float* hf = reinterpret_cast<float*>(smem + lay.hf);
  float* cf = reinterpret_cast<float*>(smem + lay.cf);
  float* gsm = reinterpret_cast<float*>(smem + lay.gs);
  float* sq = reinterpret_cast<float*>(smem + lay.sq);
  float* red = reinterpret_cast<float*>(smem + lay.red);

  const T* w = static_cast<const T*>(a.w);
  T* out = static_cast<T*>(a.out);

  // This CTA's rows of w_hh: local row r = g*u + jl is global row g*H + j0 + jl.
  for (int idx = tid; idx < R * ld; idx += kThreads) {
    const int r = idx / ld, kk = idx % ld, g = r / u, jl = r % u;
    T v = from_f<T>(0.f);
    if (jl < nu && kk < H) v = w[(size_t)(g * H + j0 + jl) * H + kk];
    ws[idx] = v;
  }
  // Both copies of h are zero (the padding columns [H, Hx) stay zero), the slice too.
  for (int idx = tid; idx < 2 * bs * ld; idx += kThreads) hx[idx] = from_f<T>(0.f);
  for (int idx = tid; idx < bs * u; idx += kThreads) hl[idx] = from_f<T>(0.f);
  __syncthreads();
  // Step 0: h0 (and c0) of this CTA's items.
  for (int q = tid; q < items; q += kThreads) {
    const int bl = q / nu, jl = q % nu;
    const size_t o = (size_t)(cb0 + bl) * H + j0 + jl;
    const T hv = static_cast<const T*>(a.h0)[o];
    hl[bl * u + jl] = hv;
    hf[bl * u + jl] = to_f(hv);
    if (Gated) cf[bl * u + jl] = to_f(static_cast<const T*>(a.c0)[o]);
  }
  cluster_sync();  // every CTA's buffers are initialized before anyone writes into them

  float acc_ns = 0.f, acc_tar = 0.f, acc_ar = 0.f;
  ClusterIn first{};
  for (int k = 0; k <= T_; ++k) {
    if (k >= 1) {
      cluster_wait();  // h_{k-1} of the whole cluster is in hx[(k-1) & 1]
      const T* hprev = hx + (size_t)((k - 1) & 1) * bs * ld;
      cluster_product<T, NTG>(hprev, nbv, ws, R, ld, Hx, s.tf32 != 0, zs, R, red);
      #pragma unroll 1
      for (int q = tid; q < items; q += kThreads) {
        const int bl = q / nu, jl = q % nu, b = cb0 + bl, j = j0 + jl;
        const ClusterIn in = q == tid ? first : cluster_inputs<T, Gated>(a, k, b, j);
        const float hp = hf[bl * u + jl];
        float h = hp;
        if (k <= row_length(a.lengths, b, T_)) {
          const float* zr = zs + (size_t)bl * R;
          if (Gated) {
            const float ig = sigmoidf_(zr[jl] + in.x[0]);
            const float fg = sigmoidf_(zr[u + jl] + in.x[1]);
            const float gg = tanhf(zr[2 * u + jl] + in.x[2]);
            const float og = sigmoidf_(zr[3 * u + jl] + in.x[3]);
            const float c = fg * cf[bl * u + jl] + ig * gg;
            h = og * tanhf(c);
            cf[bl * u + jl] = c;
            float* gr = gsm + (size_t)bl * 4 * u + jl;
            gr[0] = ig;
            gr[u] = fg;
            gr[2 * u] = gg;
            gr[3 * u] = og;
          } else {
            const float z = zr[jl] + in.x[0];
            if (cell == kReLU) h = z < 0.f ? 0.f : z;
            else if (cell == kTanh) h = tanhf(z);
            else h = z > s.theta ? z : 0.f;
          }
          if (s.w_tar != 0.f && k >= 2) acc_tar += (h - hp) * (h - hp);
          if (s.w_ar != 0.f) acc_ar += (in.m * h) * (in.m * h);
        }
        hf[bl * u + jl] = h;
        hl[bl * u + jl] = from_f<T>(h);
      }
    }
    __syncthreads();
    // Publish step k: partial sums of squares per batch row (fixed order), then this CTA's
    // slice of h_k into hx[k & 1] of every CTA of the cluster (16-byte DSMEM stores).
    float* sqk = sq + (size_t)(k % 3) * bs;
    #pragma unroll 1
    for (int bl = warp; bl < nbv; bl += kWarps) {
      float v = 0.f;
      #pragma unroll 1
      for (int jl = lane; jl < nu; jl += 32) v += hf[bl * u + jl] * hf[bl * u + jl];
      v = warp_sum(v);
      if (lane == 0) sqk[bl] = v;
    }
    T* hcur = hx + (size_t)(k & 1) * bs * ld;
    int c = p_c0, bl = p_bl0, dst = p_dst0;  // chunk i = (dst * nbv + bl) * cpn + c
#pragma unroll 1
    for (int i = tid; i < C * per_rank; i += kThreads) {
#ifdef RNNREG_PLANT_CLUSTER
      if (dst != rank || s.plant != 1)  // planted (1): the CTA's own copy of h misses its slice
#endif
      cluster_st16(cluster_map(hcur + (size_t)bl * ld + j0 + c * E, dst),
                   *reinterpret_cast<const uint4*>(hl + (size_t)bl * u + c * E));
      c += p_dc;
      if (c >= cpn) {
        c -= cpn;
        ++bl;
      }
      bl += p_dbl;
      if (bl >= nbv) {
        bl -= nbv;
        ++dst;
      }
      dst += p_ddst;
    }
    cluster_arrive();

    // Off the critical path (until the next wait): the step's global stores ...
    if (k >= 1) {
      #pragma unroll 1
      for (int q = tid; q < items; q += kThreads) {
        const int bl = q / nu, jl = q % nu, b = cb0 + bl, j = j0 + jl;
        const int L = row_length(a.lengths, b, T_);
        const size_t sidx = ((size_t)(k - 1) * B + b) * H + j;  // step-indexed [T, B, H]
        const float h = hf[bl * u + jl];
        if (k <= L) {
          out[((size_t)position(k, L, s.reverse) * B + b) * H + j] = from_f<T>(h);
          if (a.hsave) a.hsave[sidx] = h;
          if (Gated) {
            const float* gr = gsm + (size_t)bl * 4 * u + jl;
            float* gs = a.gates + ((size_t)(k - 1) * B + b) * GH;
            gs[j] = gr[0];
            gs[H + j] = gr[u];
            gs[2 * H + j] = gr[2 * u];
            gs[3 * H + j] = gr[3 * u];
          }
        } else {  // past the row's length: position k-1 is never reached
          out[((size_t)(k - 1) * B + b) * H + j] = from_f<T>(0.f);
          if (a.hsave) a.hsave[sidx] = 0.f;
        }
        if (Gated) a.cs[sidx] = cf[bl * u + jl];
        if (k == T_) {
          static_cast<T*>(a.hn)[(size_t)b * H + j] = from_f<T>(h);
          if (Gated) static_cast<T*>(a.cn)[(size_t)b * H + j] = from_f<T>(cf[bl * u + jl]);
        }
      }
      // ... the norms of step k-1 (batch rows bl = rank + i*C; one lane per CTA of the
      // cluster reads that CTA's partial sum, fixed order), ...
      const float* sqp = sq + (size_t)((k - 1) % 3) * bs;
      #pragma unroll 1
      #pragma unroll 1
    for (int bl = rank + warp * C; bl < nbv; bl += kWarps * C) {
        float v = lane < C ? cluster_ld_f32(cluster_map(sqp + bl, lane)) : 0.f;
        v = warp_sum(v);
        if (lane == 0) {
          const int b = cb0 + bl;
          const bool valid = k - 1 <= row_length(a.lengths, b, T_);
          const float n = sqrtf(v + s.heps);
          a.norms[(size_t)(k - 1) * B + b] = valid ? n : 0.f;
          if (valid && s.w_ns != 0.f && (k - 1 >= 2 || (k - 1 == 1 && s.ns_include_initial))) {
            const float d = n - a.norms[(size_t)(k - 2) * B + b];  // written by this thread
            acc_ns += d * d;
          }
        }
      }
    }
    // ... and x_{k+1} of this thread's first item.
    if (tid < items && k < T_)
      first = cluster_inputs<T, Gated>(a, k + 1, cb0 + tid / nu, j0 + tid % nu);
  }
  cluster_wait();
  // The norms of step T (as above).
  {
    const float* sqp = sq + (size_t)(T_ % 3) * bs;
    #pragma unroll 1
    for (int bl = rank + warp * C; bl < nbv; bl += kWarps * C) {
      float v = lane < C ? cluster_ld_f32(cluster_map(sqp + bl, lane)) : 0.f;
      v = warp_sum(v);
      if (lane == 0) {
        const int b = cb0 + bl;
        const float n = sqrtf(v + s.heps);
        a.norms[(size_t)T_ * B + b] = T_ <= row_length(a.lengths, b, T_) ? n : 0.f;
        if (T_ <= row_length(a.lengths, b, T_) && s.w_ns != 0.f &&
            (T_ >= 2 || s.ns_include_initial)) {
          const float d = n - a.norms[(size_t)(T_ - 1) * B + b];
          acc_ns += d * d;
        }
      }
    }
  }
  // Penalty terms: warps -> CTA (fixed order), weighted -> sums[cta][3].
  float v[3] = {acc_ns, acc_tar, acc_ar};
#pragma unroll
  for (int i = 0; i < 3; ++i) v[i] = warp_sum(v[i]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < 3; ++i) red[warp * 3 + i] = v[i];
  }
  __syncthreads();
  if (tid < 3) {
    float t = 0.f;
    for (int i = 0; i < kWarps; ++i) t += red[i * 3 + tid];
    const float weight = tid == 0 ? s.w_ns : (tid == 1 ? s.w_tar : s.w_ar);
    a.sums[(size_t)blockIdx.x * 3 + tid] = weight * t;
  }
  cluster_sync();  // no CTA leaves while another still reads its shared memory
#endif
}

template <int NTG, bool Gated>
const void* cluster_kernel_ptr(int dtype) {
  if (dtype == kBFloat16)
    return reinterpret_cast<const void*>(&cluster_forward_kernel<__nv_bfloat16, NTG, Gated>);
  if (dtype == kFloat16)
    return reinterpret_cast<const void*>(&cluster_forward_kernel<__half, NTG, Gated>);
  return reinterpret_cast<const void*>(&cluster_forward_kernel<float, NTG, Gated>);
}

int cluster_ntg(int bs) { return bs > 8 ? 2 : 1; }

const void* cluster_forward_kernel_ptr(int dtype, int bs, int cell) {
  if (cell == kLSTM)
    return cluster_ntg(bs) == 2 ? cluster_kernel_ptr<2, true>(dtype)
                                : cluster_kernel_ptr<1, true>(dtype);
  return cluster_ntg(bs) == 2 ? cluster_kernel_ptr<2, false>(dtype)
                              : cluster_kernel_ptr<1, false>(dtype);
}

namespace {

size_t cluster_fwd_bytes(int G, int H, int units, int bs, int es) {
  return cluster_layout(G, H, units, bs, es).total;
}
const ClusterPlanKind kClusterFwd = {"the cluster variant", &cluster_fwd_bytes,
                                     &cluster_forward_kernel_ptr};

}  // namespace

std::string make_cluster_plan(int cell, int dtype, int B, int H, int device, int units_override,
                              int csize_max, ClusterPlan* plan) {
  return cluster_plan_or_why(kClusterFwd, cell, dtype, B, H, device, units_override, csize_max,
                             plan);
}

int cluster_max_hidden(int cell, int dtype, int B, int device, int csize_max) {
  return cluster_search_max_hidden(kClusterFwd, cell, dtype, B, device, csize_max);
}

std::string launch_cluster_forward(int dtype, const ClusterFwdArgs& args, cudaStream_t stream) {
  const void* fn = cluster_forward_kernel_ptr(dtype, args.plan.bs, args.s.cell);
  cudaError_t e = cluster_set_attributes(fn, args.plan);
  if (e != cudaSuccess)
    return std::string("rnnreg cluster forward: cudaFuncSetAttribute failed: ") +
           cudaGetErrorString(e);
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = cluster_config(args.plan, attr, stream);
  ClusterFwdArgs copy = args;
  void* params[] = {&copy};
  e = cudaLaunchKernelExC(&cfg, fn, params);
  if (e != cudaSuccess)
    return "rnnreg cluster forward: launch of " + std::to_string(args.plan.clusters) +
           " clusters of " + std::to_string(args.plan.csize) + " CTAs failed: " +
           cudaGetErrorString(e);
  return "";
}

}  // namespace rnnreg

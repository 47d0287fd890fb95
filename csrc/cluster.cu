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
#include "cluster_api.h"
#include "common.cuh"

namespace rnnreg {

__host__ __device__ inline int cl_round8(int x) { return (x + 7) / 8 * 8; }

// Scratch of cluster_product (K parts: kWarps items x 2 n8 tiles x 32 lanes x 4 floats), of
// the FFMA product (kRedFloats) and of the final penalty sums (kWarps x 3).
constexpr int kClusterRedFloats = kWarps * 2 * 128 > kRedFloats ? kWarps * 2 * 128 : kRedFloats;

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

// One work item of cluster_product: m16 tile `mt` of the weight rows, K steps kp, kp + KP, ...
// (4 interleaved accumulators per n8 tile, summed in a fixed order), NTG n8 tiles of batch
// rows from nt0.  KP == 1: the tiles go to `out`; else to red[item][j][lane][4].
template <typename T, int NTG>
__device__ __forceinline__ void cluster_item(const T* X, int M, const T* W, int N, int ld, int KS,
                                             int KP, int item, int nt0, float* out, int ldo,
                                             float* red) {
  using F = Frag<T>;
  const int lane = threadIdx.x % 32;
  const int mt = item / KP, kp = item % KP;
  const int ao = F::a_off(mt * 16, N, ld, lane, 0), ao8 = F::a_off(mt * 16, N, ld, lane, 1);
  int bo[NTG];
#pragma unroll
  for (int j = 0; j < NTG; ++j) bo[j] = F::b_off((nt0 + j) * 8, M, ld, lane);
  float acc[4][NTG][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int j = 0; j < NTG; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][j][e] = 0.f;
  // K steps kp, kp + KP, ...: groups of 4 on 4 accumulators, then the tail on the first.
  const int nmain = KS - 3 * KP > kp ? (KS - 3 * KP - kp + 4 * KP - 1) / (4 * KP) : 0;
#pragma unroll 1
  for (int it = 0; it < nmain; ++it) {
    const int ks = kp + it * 4 * KP;
    uint32_t af[4][4], bf[4][NTG][2];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int k0 = (ks + r * KP) * F::KS;
      F::load_a(af[r], W, ao + k0, ao8 + k0);
#pragma unroll
      for (int j = 0; j < NTG; ++j) F::load_b(bf[r][j], X, bo[j] + k0);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int j = 0; j < NTG; ++j) F::mma(acc[r][j], af[r], bf[r][j]);
  }
#pragma unroll 1
  for (int kt = kp + nmain * 4 * KP; kt < KS; kt += KP) {
    uint32_t af[4], bf[NTG][2];
    F::load_a(af, W, ao + kt * F::KS, ao8 + kt * F::KS);
#pragma unroll
    for (int j = 0; j < NTG; ++j) F::load_b(bf[j], X, bo[j] + kt * F::KS);
#pragma unroll
    for (int j = 0; j < NTG; ++j) F::mma(acc[0][j], af, bf[j]);
  }
#pragma unroll
  for (int r = 1; r < 4; ++r)
#pragma unroll
    for (int j = 0; j < NTG; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[0][j][e] += acc[r][j][e];
  const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int j = 0; j < NTG; ++j) {
    if (KP == 1) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = mt * 16 + gid + 8 * (e >> 1), m = (nt0 + j) * 8 + 2 * tig + (e & 1);
        if (n < N && m < M) out[(size_t)m * ldo + n] = acc[0][j][e];
      }
    } else {
      float4 v;
      v.x = acc[0][j][0]; v.y = acc[0][j][1]; v.z = acc[0][j][2]; v.w = acc[0][j][3];
      *reinterpret_cast<float4*>(red + ((size_t)(item * 2 + j) * 32 + lane) * 4) = v;
    }
  }
}

// The step product of the cluster kernel: out[m * ldo + n] = sum_k X[m][k] W[n][k] for the M
// staged batch rows X ([M][ld], dtype T) and the CTA's N weight rows W ([N][ld]), K padded to
// Kp with zeros.  A batch slice is short (a few rows), so the weights are the m16 side of the
// mma (A operand, ldmatrix.x4) and the batch rows the n8 side (B, ldmatrix.x2; rows past M
// read row M-1, their results are dropped): no m16 tile is padded with copies of 4 batch rows.
// The m16 tiles of weight rows are dealt to the warps, with K split into KP = kWarps / MT
// parts when there are fewer tiles than warps; the parts are added in a fixed order through
// `red` (deterministic).  NTG n8 tiles of batch rows per pass (a kernel template argument,
// so that only one shape is compiled per kernel; with NTG = 2 and an odd number of tiles the
// last pass's second tile reads row M-1 and is dropped).  fp32: TF32 mma when `tf32`, else the
// FFMA block_matvec of common.cuh.  Called by all threads; ends with a __syncthreads.
template <typename T, int NTG>
__device__ void cluster_product(const T* X, int M, const T* W, int N, int ld, int Kp, bool tf32,
                                float* out, int ldo, float* red) {
  if constexpr (std::is_same<T, float>::value) {
    if (!tf32) {
      block_matvec<float>(W, N, X, M, ld, out, ldo, red);
      __syncthreads();
      return;
    }
  }
  (void)tf32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int MT = (N + 15) / 16, NT = (M + 7) / 8, KS = Kp / Frag<T>::KS;
  const int KP = MT >= kWarps ? 1 : kWarps / MT;
  const int work = MT * KP;
  for (int nt0 = 0; nt0 < NT; nt0 += NTG) {
    #pragma unroll 1
    for (int item = warp; item < work; item += kWarps)
      cluster_item<T, NTG>(X, M, W, N, ld, KS, KP, item, nt0, out, ldo, red);
    __syncthreads();
    // K parts: one (tile, lane) float4 per thread, summed in a fixed order.
    const int ntg = NTG, red_n = KP > 1 ? MT * ntg * 32 : 0;
    #pragma unroll 1
    for (int idx = threadIdx.x; idx < red_n; idx += kThreads) {
      const int t = idx / 32, l = idx % 32, mt = t / ntg, j = t % ntg;
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
      #pragma unroll 1
      for (int kp = 0; kp < KP; ++kp) {
        const float4 v =
            reinterpret_cast<const float4*>(red)[((size_t)((mt * KP + kp) * 2 + j)) * 32 + l];
        sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
      }
      const float vals[4] = {sum.x, sum.y, sum.z, sum.w};
      const int gid = l >> 2, tig = l & 3;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = mt * 16 + gid + 8 * (e >> 1), m = (nt0 + j) * 8 + 2 * tig + (e & 1);
        if (n < N && m < M) out[(size_t)m * ldo + n] = vals[e];
      }
    }
    __syncthreads();
  }
  (void)lane;
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
      if (dst != rank)  // planted: the CTA's own copy of h misses its own slice
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

cudaLaunchConfig_t cluster_config(const ClusterPlan& p, cudaLaunchAttribute* attr,
                                  cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)(p.csize * p.clusters));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = p.smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = (unsigned)p.csize;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

cudaError_t set_attributes(const void* fn, const ClusterPlan& p) {
  cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)p.smem);
  if (e == cudaSuccess && p.csize > 8)
    e = cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  return e;
}

int compute_major(int device) {
#ifdef RNNREG_EMULATE
  (void)device;
  return 9;  // the emulation stands for a Hopper GPU
#else
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return 0;
  return major;
#endif
}

const char* cl_cell_name(int cell) {
  switch (cell) {
    case kLSTM: return "lstm";
    case kReLU: return "relu";
    case kTanh: return "tanh";
    default: return "trec";
  }
}

// The plan without the device-wide H search (make_cluster_plan adds it to the message).
std::string try_cluster_plan(int cell, int dtype, int B, int H, int device, int units_override,
                             int csize_max, ClusterPlan* plan, int* smem_limit) {
  if (cell < kLSTM || cell > kTrec)
    return "the cluster variant runs the lstm, relu, tanh and trec cells only";
  int sms = 0, optin = 0;
  cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess)
    return std::string("querying device ") + std::to_string(device) + " failed: " +
           cudaGetErrorString(e);
  *smem_limit = optin;
  const int major = compute_major(device);
  if (major < 9)
    return "the cluster variant needs thread-block clusters and distributed shared memory "
           "(compute capability 9.0+), device " + std::to_string(device) + " has major " +
           std::to_string(major);
  const int G = gates_of(cell), es = dtype_size(dtype);
  const int cmax = csize_max > 0 ? (csize_max < 16 ? csize_max : 16) : 16;
  ClusterPlan p;
  p.units = cl_round8(units_override > 0 ? units_override : (H + cmax - 1) / cmax);
  p.csize = (H + p.units - 1) / p.units;
  if (p.csize > 16)
    return std::to_string(p.units) + " units per CTA need " + std::to_string(p.csize) +
           " CTAs per cluster, more than the 16 of sm_90";
  if (cluster_layout(G, H, p.units, 1, es).total > (size_t)optin)
    return "the w_hh slice of " + std::to_string(p.units) + " units x " + std::to_string(G * H) +
           " weights per CTA (a cluster of " + std::to_string(p.csize) + ") needs " +
           std::to_string(cluster_layout(G, H, p.units, 1, es).total / 1024) +
           " KiB of shared memory, more than the " + std::to_string(optin / 1024) +
           " KiB of this device";
  // Batch slices: as many clusters as fit at once (at least one row each), then the largest
  // slice that fits in shared memory.
  const void* fn = cluster_forward_kernel_ptr(dtype, 1, cell);
  p.bs = 1;
  p.clusters = 1;
  p.smem = cluster_layout(G, H, p.units, 1, es).total;
  cudaLaunchAttribute attr[1];
  int active = 0;
  e = set_attributes(fn, p);
  if (e == cudaSuccess) {
    const cudaLaunchConfig_t cfg = cluster_config(p, attr, nullptr);
    e = cudaOccupancyMaxActiveClusters(&active, fn, &cfg);
  }
  if (e != cudaSuccess)
    return std::string("cluster occupancy query failed: ") + cudaGetErrorString(e);
  if (active < 1)
    return "a cluster of " + std::to_string(p.csize) + " CTAs with " +
           std::to_string(p.smem / 1024) + " KiB of shared memory each cannot be scheduled";
  int bs = (B + active - 1) / active;
  while (bs > 1 && cluster_layout(G, H, p.units, bs, es).total > (size_t)optin) --bs;
  p.bs = bs;
  p.clusters = (B + bs - 1) / bs;
  p.smem = cluster_layout(G, H, p.units, bs, es).total;
  *plan = p;
  return "";
}

}  // namespace

std::string make_cluster_plan(int cell, int dtype, int B, int H, int device, int units_override,
                              int csize_max, ClusterPlan* plan) {
  int optin = 0;
  std::string why =
      try_cluster_plan(cell, dtype, B, H, device, units_override, csize_max, plan, &optin);
  if (why.empty() || cell < kLSTM || cell > kTrec || optin == 0 || compute_major(device) < 9)
    return why;
  const int hmax = cluster_max_hidden(cell, dtype, B, device, csize_max);
  return std::string("the cluster variant cannot keep w_hh in one cluster for cell=") +
         cl_cell_name(cell) + ", H=" + std::to_string(H) + ": " + why +
         ". On this device this cell and dtype fit H <= " + std::to_string(hmax) +
         " in a cluster; unset RNNREG_CUDA_VARIANT for the persistent kernels";
}

int cluster_max_hidden(int cell, int dtype, int B, int device, int csize_max) {
  ClusterPlan p;
  int optin = 0;
  int lo = 0, hi = 1 << 14;
  if (try_cluster_plan(cell, dtype, B, hi, device, 0, csize_max, &p, &optin).empty()) return hi;
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (try_cluster_plan(cell, dtype, B, mid, device, 0, csize_max, &p, &optin).empty()) lo = mid;
    else hi = mid;
  }
  return lo;
}

std::string launch_cluster_forward(int dtype, const ClusterFwdArgs& args, cudaStream_t stream) {
  const void* fn = cluster_forward_kernel_ptr(dtype, args.plan.bs, args.s.cell);
  cudaError_t e = set_attributes(fn, args.plan);
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

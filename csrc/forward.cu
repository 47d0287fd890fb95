// Forward of the recurrence: one persistent cooperative launch for all T steps.
//
// Block `blk` owns hidden units [blk*units, blk*units + nu) and keeps the G*units rows of w_hh
// for them in shared memory for the whole sequence.  Per step it stages h_{k-1} (input dtype,
// from a double-buffered global exchange buffer, 16-byte cp.async chunks all in flight) for a
// tile of batch rows, computes its slice of z = x_k + h_{k-1} W^T (tensor cores for
// bf16/fp16, FP32 FMAs for fp32: step_product in common.cuh), applies the cell, publishes its
// slice of h_k, and writes its partial sum of squares of h_k per batch row.  A grid-wide
// barrier ends the step.  The norms of step k-1 (and the cell norms, when asked for) are
// reduced (in a fixed order, so deterministically) by the block that owns the batch row
// (b % blocks) while the copies of the first h tile of step k are in flight; TAR/AR/NS sums
// stay in registers until the end.  normprop is the LSTM with h = o * tanh(a * c) * h_scale.
#include <cooperative_groups.h>

#include "common.cuh"

namespace rnnreg {
namespace cg = cooperative_groups;

// The per-block partial sums of squares: part[ch][k & 1][b][nbp], channel 0 of h, channel 1 of
// c (only with cell norms: channels() is then 2).  A row holds the blocks' partials at [0, nblk)
// and zeros up to nbp = fwd_part_stride(nblk) (a multiple of 4: one 16-byte load per lane).
__device__ __forceinline__ int channels(const FwdArgs& a) { return a.cnorms ? 2 : 1; }
__device__ __forceinline__ float* partials(float* part, int ch, int k, int B, int nbp) {
  return part + ((size_t)ch * 2 + (k & 1)) * B * nbp;
}

// norms[k, b] (and cnorms[k, b]) for this block's batch rows (b = blk + i * blocks), plus
// the NS sum.  One warp per row: lane l adds the partials [4l, 4l + 4) and 128 + l (the plan
// keeps blocks <= kFwdMaxBlocks = 160), then a butterfly; fixed order, so deterministic.
__device__ __forceinline__ void reduce_norms(const FwdArgs& a, float* part, int nbp, int k,
                                             float& acc_ns) {
  const Scalars& s = a.s;
  const int B = s.B, nblk = gridDim.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nch = channels(a);
  for (int idx = warp;; idx += kWarps) {
    const long long bl = (long long)blockIdx.x + (long long)idx * nblk;
    if (bl >= B) break;
    const int b = (int)bl;
    // the row's length and n_{k-1} (written by this lane in the previous step) are loaded
    // with the partials; nothing loaded waits for another load
    const int64_t Lraw = a.lengths ? a.lengths[b] : (int64_t)s.T;
    const float prev = k >= 1 ? a.norms[(size_t)(k - 1) * B + b] : 0.f;
#pragma unroll 1
    for (int ch = 0; ch < nch; ++ch) {
      const float* pk = partials(part, ch, k, B, nbp) + (size_t)b * nbp;
      float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
      if (4 * lane < nblk) q = __ldcg(reinterpret_cast<const float4*>(pk) + lane);
      float sq = (q.x + q.y) + (q.z + q.w);
      if (128 + lane < nblk) sq += __ldcg(pk + 128 + lane);
      sq = warp_sum(sq);
      if (lane == 0) {
        // all ones while k <= max(L, 1) (the clamped length), else 0 (norm 0 past the length):
        // bit operations on the loaded length rather than a compare and select
        const int keep = k <= 1 ? -1 : ~(int)((Lraw - k) >> 63);
        const float n = sqrtf(sq + s.heps);
        (ch ? a.cnorms : a.norms)[(size_t)k * B + b] = __int_as_float(__float_as_int(n) & keep);
        if (ch == 0 && s.w_ns != 0.f && (k >= 2 || (k == 1 && s.ns_include_initial))) {
          const float d = n - prev;
          acc_ns += __int_as_float(__float_as_int(d * d) & keep);
        }
      }
    }
  }
}

// Gated: the 4-gate cells with a cell state (lstm, normprop); else the one-gate RNN cells
// (relu, tanh, trec: the activation is picked at run time).  Each kernel carries only its
// cells' update code (the host picks the instantiation by cell: forward_kernel_ptr).
//
// Threads and items: lane l of warp w owns unit jl = l % nu of batch row bl = w * (32 / nu) +
// l / nu of every batch tile (the same (row, unit) at every step; lanes past 32 / nu rows idle),
// so the nu items of a row sit in one warp and its sum of squares is a segmented shuffle.  The
// plan keeps nu <= 32 and bs <= kWarps * (32 / units).
template <typename T, bool Gated>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(FwdArgs a) {
  cg::grid_group grid = cg::this_grid();
  constexpr bool kHalf = !std::is_same<T, float>::value;  // bf16 / fp16: fwd_product_direct
  const Scalars& s = a.s;
  const int T_ = s.T, B = s.B, H = s.H, cell = s.cell;
  constexpr bool lstm = Gated;
  const int G = lstm ? 4 : 1, GH = G * H;
  const int units = a.plan.units, bs = a.plan.bs_fwd;
  const int Hx = xrow(H), ld = srow(H, (int)sizeof(T)), R = G * units;
  const int blk = blockIdx.x, nblk = gridDim.x;
  const int j0 = blk * units, nu = min(units, H - j0);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int NTp = fwd_slots_per_mtile(G, units);

  unsigned char* smem = dynamic_smem();
  const Layout lay = fwd_layout(G, H, units, bs, (int)sizeof(T));
  T* ws = reinterpret_cast<T*>(smem + lay.w);
  T* hs = reinterpret_cast<T*>(smem + lay.a);
  float* zs = reinterpret_cast<float*>(smem + lay.z);
  float* red = reinterpret_cast<float*>(smem + lay.red);

  const T* w = static_cast<const T*>(a.w);
  const T* h0 = static_cast<const T*>(a.h0);
  const T* xin = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  T* hn_out = static_cast<T*>(a.hn);
  T* cn_out = static_cast<T*>(a.cn);
  T* hbuf = reinterpret_cast<T*>(a.scratch);       // [2][B][Hx] h exchange, input dtype
  const int nbp = fwd_part_stride(nblk);
  float* part = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(a.scratch) +
                                         align16(2 * (size_t)B * Hx * sizeof(T)));  // [2][2][B][nbp]
  float* bpart = part + 4 * (size_t)B * nbp;       // [blocks][3]
  const int nch = channels(a);

  // This block's rows of w_hh: local row r = g*units + jl is global row g*H + j0 + jl; bf16/fp16
  // columns in the order of fwd_product_direct (fwd_perm_col within each 16-wide K step).
  for (int idx = tid; idx < R * ld; idx += kThreads) {
    const int r = idx / ld, kk = idx % ld, g = r / units, jl = r % units;
#ifdef RNNREG_PLANT_BUG
    // planted: the weights keep the natural column order while h is read permuted
    const int col = kHalf ? (kk & ~15) + (s.plant == 10 ? kk & 15 : fwd_perm_col(kk & 15)) : kk;
#else
    const int col = kHalf ? (kk & ~15) + fwd_perm_col(kk & 15) : kk;
#endif
    T v = from_f<T>(0.f);
    if (jl < nu && col < H) v = w[(size_t)(g * H + j0 + jl) * H + col];
    ws[idx] = v;
  }
  // The exchange rows' padding columns [H, Hx) are zero in both buffers (never rewritten), and
  // so are the partial rows' padding [nblk, nbp).
  if (blk == 0) {
    for (int idx = tid; idx < 2 * B * (Hx - H); idx += kThreads)
      hbuf[(size_t)(idx / (Hx - H)) * Hx + H + idx % (Hx - H)] = from_f<T>(0.f);
    for (int idx = tid; idx < 4 * B * (nbp - nblk); idx += kThreads)
      part[(size_t)(idx / (nbp - nblk)) * nbp + nblk + idx % (nbp - nblk)] = 0.f;
  }

  // Step 0: publish h0 and its partial sums of squares (and those of c0).
  for (int b = warp; b < B; b += kWarps)
    for (int ch = 0; ch < nch; ++ch) {
      const T* src = ch ? static_cast<const T*>(a.c0) : h0;
      float sq = 0.f;
      for (int jl = lane; jl < nu; jl += 32) {
        const float v = to_f(src[(size_t)b * H + j0 + jl]);
        if (ch == 0) __stcg(hbuf + (size_t)b * Hx + j0 + jl, h0[(size_t)b * H + j0 + jl]);
        sq += v * v;
      }
      sq = warp_sum(sq);
      if (lane == 0) __stcg(partials(part, ch, 0, B, nbp) + (size_t)b * nbp + blk, sq);
    }

  // This thread's item of every tile: row bl of the tile, unit j (fixed for the whole call).
  const int rpw = 32 / nu, lr = lane / nu, jl = lane - lr * nu, bl = warp * rpw + lr, j = j0 + jl;
  const bool lane_ok = lr < rpw;
  const float ca = lstm && lane_ok && a.cell_scale ? a.cell_scale[j] : 1.f;  // normprop's a_j
  // The length of this thread's row in the tile processed next (loaded one tile ahead, and
  // clamped only when used, so nothing in the tile that loads it depends on it).
  int64_t Lnext = a.lengths && lane_ok && bl < B ? a.lengths[bl] : (int64_t)T_;
  float acc_ns = 0.f, acc_tar = 0.f, acc_ar = 0.f;
  grid.sync();

  for (int k = 1; k <= T_; ++k) {
    const T* hprev = hbuf + (size_t)((k - 1) & 1) * B * Hx;
    T* hcur = hbuf + (size_t)(k & 1) * B * Hx;

    for (int b0 = 0; b0 < B; b0 += bs) {
      const int nb = min(bs, B - b0);
      const int b = b0 + bl;
      const bool item = lane_ok && bl < nb;
      const size_t sidx = ((size_t)(k - 1) * B + b) * H + j;  // step-indexed [T, B, H]
      const int L = clamp_length(Lnext, T_);
      const bool valid = k <= L;
      const int pos = s.reverse ? max(L - k, 0) : k - 1;  // (clamped past the length: unused)
      // The inputs of this item that do not depend on the exchange, issued before the step
      // product so that their latency overlaps it: x_k, c_{k-1}, the own element of h_{k-1}
      // (the carried state past the length; TAR of fp32), the fp32 h_{k-1} for TAR (bf16 /
      // fp16: the saved state) and the AR mask.
      float xv[4] = {0.f, 0.f, 0.f, 0.f};
      float cp = 0.f, hpx = 0.f, hps = 0.f, m = 1.f;
      if (item) {
        const T* xr = xin + ((size_t)pos * B + b) * (size_t)GH + j;
#pragma unroll
        for (int g = 0; g < 4; ++g)
          if (g < G) xv[g] = to_f(xr[(size_t)g * H]);
        if (lstm)
          cp = k == 1 ? to_f(static_cast<const T*>(a.c0)[(size_t)b * H + j])
                      : a.cs[sidx - (size_t)B * H];
        hpx = to_f(__ldcg(hprev + (size_t)b * Hx + j));
        if (a.hsave && s.w_tar != 0.f && k >= 2) hps = a.hsave[sidx - (size_t)B * H];
        if (a.mask && s.w_ar != 0.f) m = to_f(static_cast<const T*>(a.mask)[(size_t)b * H + j]);
      }
      {  // the next tile's length (this step's next tile, or the first tile of the next step)
        const int bn = (b0 + bs < B ? b0 + bs : 0) + bl;
#ifdef RNNREG_PLANT_BUG
        if (s.plant == 8) Lnext = L;  // planted: the length is not advanced to the next tile
        else
#endif
        Lnext = a.lengths && lane_ok && bn < B ? a.lengths[bn] : (int64_t)T_;
      }
      // The norms of step k-1, reduced while the h loads (or copies) of the first tile fly.
      auto norms_of_last_step = [&] {
        if (b0 == 0) reduce_norms(a, part, nbp, k - 1, acc_ns);
      };
      if constexpr (kHalf) {
        fwd_product_direct<T, Gated ? 4 : 1>(hprev + (size_t)b0 * Hx, Hx, nb, ws, R, ld, Hx, red,
                                             norms_of_last_step);
      } else {
        stage_rows<T>(hs, ld, hprev, Hx, b0, nb);
        norms_of_last_step();
        cp_async_wait_all();
        __syncthreads();
        step_product<T>(hs, nb, ws, R, ld, Hx, s.tf32 != 0, zs, R, red);
      }
#ifdef RNNREG_PLANT_BUG
      if (s.plant != 1)  // planted race (partials written above, read below) for compute-sanitizer
#endif
        __syncthreads();

      float h = 0.f, c = 0.f;
      if (item) {
        float z[4];
#pragma unroll
        for (int g = 0; g < 4; ++g)
          if (g < G) {
            const int n = g * units + jl;
            z[g] = (kHalf ? fwd_z(red, bl, n, NTp) : zs[(size_t)bl * R + n]) + xv[g];
          }
        float hv;
        if (lstm) {
          const float ig = sigmoidf_(z[0]);
          const float fg = sigmoidf_(z[1]);
          const float gg = tanhf(z[2]);
          const float og = sigmoidf_(z[3]);
          const float cv = fg * cp + ig * gg;
          hv = og * tanhf(ca * cv) * s.h_scale;  // lstm: a = 1, h_scale = 1
#ifdef RNNREG_PLANT_BUG
          if (s.plant == 6) hv = og * tanhf(cv) * s.h_scale;  // planted: cell_scale dropped
#endif
          if (valid) {
            float* gs = a.gates + ((size_t)(k - 1) * B + b) * GH;
            gs[j] = ig;
            gs[H + j] = fg;
            gs[2 * H + j] = gg;
            gs[3 * H + j] = og;
          }
          c = valid ? cv : cp;  // past the row's length the state is carried
          a.cs[sidx] = c;
        } else {
          const float zz = z[0];
          if (cell == kReLU) hv = zz < 0.f ? 0.f : zz;
          else if (cell == kTanh) hv = tanhf(zz);
          else hv = zz > s.theta ? zz : 0.f;
        }
        h = valid ? hv : hpx;
        // past the length, position k-1 is never reached: written zero
        out[((size_t)(valid ? pos : k - 1) * B + b) * H + j] = from_f<T>(valid ? h : 0.f);
        if (a.hsave) a.hsave[sidx] = valid ? h : 0.f;
        if (valid && s.w_tar != 0.f && k >= 2) {
          const float d = h - (a.hsave ? hps : hpx);
          acc_tar += d * d;
        }
        if (valid && s.w_ar != 0.f) acc_ar += (m * h) * (m * h);
        __stcg(hcur + (size_t)b * Hx + j, from_f<T>(h));
        if (k == T_) {
          hn_out[(size_t)b * H + j] = from_f<T>(h);
          if (lstm) cn_out[(size_t)b * H + j] = from_f<T>(c);
        }
      }
      // The row's partial sums of squares: a segmented tree over its nu lanes (fixed order),
      // the sum lands in the row's first lane.
      float v = h * h, vc = c * c;
      const bool cn = lstm && a.cnorms;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        if (o < nu) {
          const float t = __shfl_down_sync(0xffffffffu, v, o);
          const float tc = cn ? __shfl_down_sync(0xffffffffu, vc, o) : 0.f;
#ifdef RNNREG_PLANT_BUG
          if (s.plant == 9 || jl + o < nu) {  // planted: the sums run into the next row
#else
          if (jl + o < nu) {
#endif
            v += t;
            vc += tc;
          }
        }
      }
      if (item && jl == 0) {
        __stcg(partials(part, 0, k, B, nbp) + (size_t)b * nbp + blk, v);
#ifdef RNNREG_PLANT_BUG
        if (s.plant == 3) vc = v;  // planted: the cell norms sum h^2
#endif
        if (cn) __stcg(partials(part, 1, k, B, nbp) + (size_t)b * nbp + blk, vc);
      }
      if (b0 + bs < B) __syncthreads();  // red / zs are rewritten by the next tile
    }
    grid.sync();
  }
  reduce_norms(a, part, nbp, T_, acc_ns);

  // Penalty sums: warps -> block (fixed order) -> grid (block 0, fixed order).
  float v[3] = {acc_ns, acc_tar, acc_ar};
#pragma unroll
  for (int i = 0; i < 3; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < 3; ++i) red[warp * 3 + i] = v[i];
  }
  __syncthreads();
  if (tid < 3) {
    float t = 0.f;
    for (int i = 0; i < kWarps; ++i) t += red[i * 3 + tid];
    __stcg(bpart + (size_t)blk * 3 + tid, t);
  }
#ifdef RNNREG_PLANT_BUG
  if (s.plant == 2 && blk == 0 && tid == 0) a.norms[(size_t)(T_ + 1) * B] = 0.f;  // planted OOB
#endif
  grid.sync();
  if (blk == 0 && tid < 3) {
    float t = 0.f;
    for (int i = 0; i < nblk; ++i) t += __ldcg(bpart + (size_t)i * 3 + tid);
    const float weight = tid == 0 ? s.w_ns : (tid == 1 ? s.w_tar : s.w_ar);
    a.terms[tid] = weight * t;
  }
}

template <bool Gated>
static const void* forward_kernel_ptr_(int dtype) {
  if (dtype == kBFloat16)
    return reinterpret_cast<const void*>(&forward_kernel<__nv_bfloat16, Gated>);
  if (dtype == kFloat16) return reinterpret_cast<const void*>(&forward_kernel<__half, Gated>);
  return reinterpret_cast<const void*>(&forward_kernel<float, Gated>);
}

const void* forward_kernel_ptr(int dtype, int cell) {
  return has_cell_state(cell) ? forward_kernel_ptr_<true>(dtype)
                              : forward_kernel_ptr_<false>(dtype);
}

std::string launch_forward(int dtype, const FwdArgs& args, cudaStream_t stream) {
  const void* fn = forward_kernel_ptr(dtype, args.s.cell);
  cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)args.plan.smem_fwd);
  if (e != cudaSuccess)
    return std::string("rnnreg forward: cudaFuncSetAttribute failed: ") + cudaGetErrorString(e);
  FwdArgs copy = args;
  void* params[] = {&copy};
  e = cudaLaunchCooperativeKernel(fn, dim3(args.plan.blocks), dim3(kThreads), params,
                                  args.plan.smem_fwd, stream);
  if (e != cudaSuccess)
    return std::string("rnnreg forward: cooperative launch of ") +
           std::to_string(args.plan.blocks) + " blocks failed: " + cudaGetErrorString(e);
  return "";
}

}  // namespace rnnreg

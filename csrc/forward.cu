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

// The per-block partial sums of squares: part[ch][k & 1][b][blk], channel 0 of h, channel 1 of
// c (only with cell norms: channels() is then 2).
__device__ __forceinline__ int channels(const FwdArgs& a) { return a.cnorms ? 2 : 1; }
__device__ __forceinline__ float* partials(float* part, int ch, int k, int B, int nblk) {
  return part + ((size_t)ch * 2 + (k & 1)) * B * nblk;
}

// norms[k, b] (and cnorms[k, b]) for this block's batch rows (b = blk + i * blocks), plus
// the NS sum.
__device__ __forceinline__ void reduce_norms(const FwdArgs& a, float* part, int k,
                                             float& acc_ns) {
  const Scalars& s = a.s;
  const int B = s.B, nblk = gridDim.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nch = channels(a);
  for (int idx = warp;; idx += kWarps) {
    const long long bl = (long long)blockIdx.x + (long long)idx * nblk;
    if (bl >= B) break;
    const int b = (int)bl;
    const bool valid = k <= row_length(a.lengths, b, s.T);
#pragma unroll 1
    for (int ch = 0; ch < nch; ++ch) {
      const float* pk = partials(part, ch, k, B, nblk);
      float sq = 0.f;
      for (int i = lane; i < nblk; i += 32) sq += __ldcg(pk + (size_t)b * nblk + i);
      sq = warp_sum(sq);
      if (lane == 0) {
        const float n = sqrtf(sq + s.heps);
        (ch ? a.cnorms : a.norms)[(size_t)k * B + b] = valid ? n : 0.f;
        if (ch == 0 && valid && s.w_ns != 0.f && (k >= 2 || (k == 1 && s.ns_include_initial))) {
          const float d = n - a.norms[(size_t)(k - 1) * B + b];  // written by this thread
          acc_ns += d * d;
        }
      }
    }
  }
}

// The inputs of one (b, j) cell update that do not depend on the exchange: x_k for the G
// gates, c_{k-1} and the cell scale a_j (cells with a cell state), the fp32 h_{k-1} for TAR
// (bf16/fp16: the saved state; fp32 reads the staged copy) and the AR mask.  Fetched for a
// thread's first item before the step product, so that their global-memory latency overlaps
// the h copies and the product.
struct CellIn {
  float x[4];
  float cp, hp, m, ca;
};

template <typename T, bool Gated>
__device__ __forceinline__ CellIn cell_inputs(const FwdArgs& a, int k, int b, int j) {
  const Scalars& s = a.s;
  const int B = s.B, H = s.H, G = Gated ? 4 : 1;
  const int L = row_length(a.lengths, b, s.T);
  const size_t sidx = ((size_t)(k - 1) * B + b) * H + j;
  CellIn in;
#pragma unroll
  for (int g = 0; g < 4; ++g) in.x[g] = 0.f;
  in.cp = in.hp = 0.f;
  in.m = in.ca = 1.f;
  if (k <= L) {
    if (a.hsave && s.w_tar != 0.f && k >= 2) in.hp = a.hsave[sidx - (size_t)B * H];
    if (a.mask && s.w_ar != 0.f) in.m = to_f(static_cast<const T*>(a.mask)[(size_t)b * H + j]);
    const T* xr = static_cast<const T*>(a.x) +
                  ((size_t)position(k, L, s.reverse) * B + b) * (size_t)(G * H);
#pragma unroll
    for (int g = 0; g < 4; ++g)
      if (g < G) in.x[g] = to_f(xr[(size_t)g * H + j]);
  }
  if (Gated) {
    in.cp = k == 1 ? to_f(static_cast<const T*>(a.c0)[(size_t)b * H + j])
                   : a.cs[sidx - (size_t)B * H];
    if (a.cell_scale) in.ca = a.cell_scale[j];
  }
  return in;
}

// Gated: the 4-gate cells with a cell state (lstm, normprop); else the one-gate RNN cells
// (relu, tanh, trec: the activation is picked at run time).  Each kernel carries only its
// cells' update code (the host picks the instantiation by cell: forward_kernel_ptr).
template <typename T, bool Gated>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(FwdArgs a) {
  cg::grid_group grid = cg::this_grid();
  const Scalars& s = a.s;
  const int T_ = s.T, B = s.B, H = s.H, cell = s.cell;
  constexpr bool lstm = Gated;
  const int G = lstm ? 4 : 1, GH = G * H;
  const int units = a.plan.units, bs = a.plan.bs_fwd;
  const int Hx = xrow(H), ld = srow(H, (int)sizeof(T)), R = G * units;
  const int blk = blockIdx.x, nblk = gridDim.x;
  const int j0 = blk * units, nu = min(units, H - j0);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  unsigned char* smem = dynamic_smem();
  const Layout lay = fwd_layout(G, H, units, bs, (int)sizeof(T));
  T* ws = reinterpret_cast<T*>(smem + lay.w);
  T* hs = reinterpret_cast<T*>(smem + lay.a);
  float* zs = reinterpret_cast<float*>(smem + lay.z);
  float* hn = reinterpret_cast<float*>(smem + lay.hn);
  float* red = reinterpret_cast<float*>(smem + lay.red);

  const T* w = static_cast<const T*>(a.w);
  const T* h0 = static_cast<const T*>(a.h0);
  T* out = static_cast<T*>(a.out);
  T* hn_out = static_cast<T*>(a.hn);
  T* cn_out = static_cast<T*>(a.cn);
  T* hbuf = reinterpret_cast<T*>(a.scratch);       // [2][B][Hx] h exchange, input dtype
  float* part = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(a.scratch) +
                                         align16(2 * (size_t)B * Hx * sizeof(T)));  // [2][B][blocks]
  float* bpart = part + 4 * (size_t)B * nblk;      // [blocks][3]
  const int nch = channels(a);

  // This block's rows of w_hh: local row r = g*units + jl is global row g*H + j0 + jl.
  for (int idx = tid; idx < R * ld; idx += kThreads) {
    const int r = idx / ld, kk = idx % ld, g = r / units, jl = r % units;
    T v = from_f<T>(0.f);
    if (jl < nu && kk < H) v = w[(size_t)(g * H + j0 + jl) * H + kk];
    ws[idx] = v;
  }
  // The exchange rows' padding columns [H, Hx) are zero in both buffers (never rewritten).
  if (blk == 0)
    for (int idx = tid; idx < 2 * B * (Hx - H); idx += kThreads)
      hbuf[(size_t)(idx / (Hx - H)) * Hx + H + idx % (Hx - H)] = from_f<T>(0.f);

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
      if (lane == 0) __stcg(partials(part, ch, 0, B, nblk) + (size_t)b * nblk + blk, sq);
    }
  float acc_ns = 0.f, acc_tar = 0.f, acc_ar = 0.f;
  grid.sync();

  for (int k = 1; k <= T_; ++k) {
    const T* hprev = hbuf + (size_t)((k - 1) & 1) * B * Hx;
    T* hcur = hbuf + (size_t)(k & 1) * B * Hx;

    for (int b0 = 0; b0 < B; b0 += bs) {
      const int nb = min(bs, B - b0);
      stage_rows<T>(hs, ld, hprev, Hx, b0, nb);
      CellIn first{};  // inputs of this thread's first item, fetched while the copies fly
      if (tid < nb * nu) first = cell_inputs<T, Gated>(a, k, b0 + tid / nu, j0 + tid % nu);
      if (b0 == 0) reduce_norms(a, part, k - 1, acc_ns);  // also while the copies are in flight
      cp_async_wait_all();
      __syncthreads();
      step_product<T>(hs, nb, ws, R, ld, Hx, s.tf32 != 0, zs, R, red);

      // One item per thread and nu a power of two <= 32: the row's nu items sit in aligned
      // groups of nu lanes, so the partial sums of squares are a segmented butterfly.
      const bool seg = nb * nu <= kThreads && nu <= 32 && (nu & (nu - 1)) == 0;
      float my_sq = 0.f, my_csq = 0.f;
      for (int q = tid; q < nb * nu; q += kThreads) {
        const int bl = q / nu, jl = q % nu, b = b0 + bl, j = j0 + jl;
        const int L = row_length(a.lengths, b, T_);
        const size_t sidx = ((size_t)(k - 1) * B + b) * H + j;  // step-indexed [T, B, H]
        const CellIn in = q == tid ? first : cell_inputs<T, Gated>(a, k, b, j);
        float h, c = 0.f;
        if (k <= L) {
          const int pos = position(k, L, s.reverse);
          const float* zr = zs + (size_t)bl * R;
          if (lstm) {
            const float ig = sigmoidf_(zr[jl] + in.x[0]);
            const float fg = sigmoidf_(zr[units + jl] + in.x[1]);
            const float gg = tanhf(zr[2 * units + jl] + in.x[2]);
            const float og = sigmoidf_(zr[3 * units + jl] + in.x[3]);
            c = fg * in.cp + ig * gg;
            h = og * tanhf(in.ca * c) * s.h_scale;  // lstm: a = 1, h_scale = 1
#ifdef RNNREG_PLANT_BUG
            if (s.plant == 6) h = og * tanhf(c) * s.h_scale;  // planted: cell_scale dropped
#endif
            float* gs = a.gates + ((size_t)(k - 1) * B + b) * GH;
            gs[j] = ig;
            gs[H + j] = fg;
            gs[2 * H + j] = gg;
            gs[3 * H + j] = og;
            a.cs[sidx] = c;
          } else {
            const float z = zr[jl] + in.x[0];
            if (cell == kReLU) h = z < 0.f ? 0.f : z;
            else if (cell == kTanh) h = tanhf(z);
            else h = z > s.theta ? z : 0.f;
          }
          out[((size_t)pos * B + b) * H + j] = from_f<T>(h);
          if (a.hsave) a.hsave[sidx] = h;
          if (s.w_tar != 0.f && k >= 2) {
            const float d = h - (a.hsave ? in.hp : to_f(hs[(size_t)bl * ld + j]));
            acc_tar += d * d;
          }
          if (s.w_ar != 0.f) acc_ar += (in.m * h) * (in.m * h);
        } else {  // past the row's length: state frozen, position k-1 is never reached
          h = to_f(hs[(size_t)bl * ld + j]);
          if (lstm) {
            c = in.cp;
            a.cs[sidx] = c;
          }
          out[((size_t)(k - 1) * B + b) * H + j] = from_f<T>(0.f);
          if (a.hsave) a.hsave[sidx] = 0.f;
        }
        __stcg(hcur + (size_t)b * Hx + j, from_f<T>(h));
        hn[bl * units + jl] = h;
        // c_k for the per-row cell-norm sums below: over z of gate i of this item, which only
        // this thread read (and only above)
        if (a.cnorms) zs[(size_t)bl * R + jl] = c;
        my_sq = h * h;
        my_csq = c * c;
        if (k == T_) {
          hn_out[(size_t)b * H + j] = from_f<T>(h);
          if (lstm) cn_out[(size_t)b * H + j] = from_f<T>(c);
        }
      }
      if (seg) {
#pragma unroll 1
        for (int ch = 0; ch < nch; ++ch) {
          float v = ch ? my_csq : my_sq;
#ifdef RNNREG_PLANT_BUG
          if (s.plant == 3) v = my_sq;  // planted: the cell norms sum h^2
#endif
          for (int o = nu / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
          if (tid < nb * nu && tid % nu == 0)
            __stcg(partials(part, ch, k, B, nblk) + (size_t)(b0 + tid / nu) * nblk + blk, v);
        }
      } else {
#ifdef RNNREG_PLANT_BUG
        if (s.plant != 1)  // planted race (hn written above, read below) for compute-sanitizer
#endif
          __syncthreads();
        const int nb_slow = seg ? 0 : nb;  // (a bound of 0 when not taken: for the profile)
        for (int bl = warp; bl < nb_slow; bl += kWarps) {  // partial sums of squares per row
          const int b = b0 + bl;
#pragma unroll 1
          for (int ch = 0; ch < nch; ++ch) {  // channel 1: c_k
            float sq = 0.f;
            for (int jl = lane; jl < nu; jl += 32) {
              const float v = ch ? zs[(size_t)bl * R + jl] : hn[bl * units + jl];
              sq += v * v;
            }
            sq = warp_sum(sq);
            if (lane == 0) __stcg(partials(part, ch, k, B, nblk) + (size_t)b * nblk + blk, sq);
          }
        }
      }
      __syncthreads();
    }
    grid.sync();
  }
  reduce_norms(a, part, T_, acc_ns);

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

// How a call is split over the grid, and whether that grid is co-resident on the device.
#include <string>

#include "common.cuh"

namespace rnnreg {
namespace {

struct Device {
  int sms = 0, smem_optin = 0, coop = 0;
  std::string error;
};

Device query(int device) {
  Device d;
  cudaError_t e = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d.coop, cudaDevAttrCooperativeLaunch, device);
  if (e != cudaSuccess) d.error = std::string("querying device ") + std::to_string(device) +
                                  " failed: " + cudaGetErrorString(e);
  return d;
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

int default_units(int G, int H, int sms) {
  int u = ceil_div(H, sms);
  const int min_u = ceil_div(kRG, G);  // at least one full row group per block
  if (u < min_u) u = min_u;
  return u < H ? u : H;
}

// Largest batch tile in [1, B] whose layout fits `limit` bytes, or 0.
template <typename LayoutFn>
int largest_tile(LayoutFn layout, int B, size_t limit) {
  if (layout(1).total > limit) return 0;
  const size_t base = layout(0).total, row = layout(1).total - base + 16;
  size_t guess = (limit - base) / row + 1;
  int bs = guess < (size_t)B ? (int)guess : B;
  while (bs > 1 && layout(bs).total > limit) --bs;
  return bs;
}

// Fills `plan`; returns "" when both kernels fit co-resident, else the reason.
std::string try_plan(int cell, int dtype, int B, int H, const Device& d, int device,
                     int units_override, Plan* plan) {
  const int G = gates_of(cell), es = dtype_size(dtype);
  Plan p;
  p.units = units_override > 0 ? (units_override < H ? units_override : H)
                               : default_units(G, H, d.sms);
  p.blocks = ceil_div(H, p.units);
  // The forward maps a block's units onto the lanes of a warp (rows of 32 / units lanes each),
  // keeps the partial tiles of one batch tile in its kAccTiles slots per lane, and reduces the
  // norms with one 16-byte and one 4-byte load per lane (forward.cu, fwd_product_direct).
  const int slots = fwd_slots_per_mtile(G, p.units);
  const int max_units = G == 4 ? kAccTiles * 8 / 4 : 32;  // 4-gate cells: 4 * units rows, 8 n8 tiles
  if (p.units > max_units || slots > kAccTiles || p.blocks > kFwdMaxBlocks) {
    *plan = p;
    return std::to_string(p.units) + " units per block in " + std::to_string(p.blocks) +
           " blocks: the forward takes at most " + std::to_string(max_units) +
           " units per block for this cell and at most " + std::to_string(kFwdMaxBlocks) +
           " blocks";
  }
  const size_t limit = (size_t)d.smem_optin;
  p.bs_fwd = largest_tile([&](int bs) { return fwd_layout(G, H, p.units, bs, es); }, B, limit);
  // one item per thread per tile, and the tile's m16 tiles x slots within kAccTiles
  const int rows_cap = kWarps * (32 / p.units), tiles_cap = 16 * (kAccTiles / slots);
  const int bs_cap = rows_cap < tiles_cap ? rows_cap : tiles_cap;
  if (p.bs_fwd > bs_cap) p.bs_fwd = bs_cap;
  p.bs_bwd = largest_tile([&](int bs) { return bwd_layout(G, H, p.units, bs, es); }, B, limit);
  if (p.bs_fwd == 0 || p.bs_bwd == 0) {
    const size_t f = fwd_layout(G, H, p.units, 1, es).total;
    const size_t b = bwd_layout(G, H, p.units, 1, es).total;
    const size_t need = f > b ? f : b;
    return "w_hh slice of " + std::to_string(p.units) + " units x " + std::to_string(G * H) +
           " weights needs " + std::to_string(need / 1024) + " KiB of shared memory per block, "
           "more than the " + std::to_string(limit / 1024) + " KiB this device allows";
  }
  p.smem_fwd = fwd_layout(G, H, p.units, p.bs_fwd, es).total;
  p.smem_bwd = bwd_layout(G, H, p.units, p.bs_bwd, es).total;
  int dev_saved = 0;
  cudaGetDevice(&dev_saved);
  if (dev_saved != device) cudaSetDevice(device);
  std::string why;
  const void* fns[2] = {forward_kernel_ptr(dtype, cell), backward_kernel_ptr(dtype, cell)};
  const size_t smem[2] = {p.smem_fwd, p.smem_bwd};
  for (int i = 0; i < 2 && why.empty(); ++i) {
    int per_sm = 0;
    cudaError_t e = cudaFuncSetAttribute(fns[i], cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem[i]);
    if (e == cudaSuccess)
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fns[i], kThreads, smem[i]);
    if (e != cudaSuccess) {
      why = std::string("occupancy query failed: ") + cudaGetErrorString(e);
    } else if ((long long)per_sm * d.sms < p.blocks) {
      why = std::to_string(p.blocks) + " blocks of " + std::to_string(smem[i] / 1024) +
            " KiB shared memory are not co-resident (" + std::to_string(per_sm) +
            " per SM x " + std::to_string(d.sms) + " SMs)";
    }
  }
  if (dev_saved != device) cudaSetDevice(dev_saved);
  *plan = p;
  return why;
}

const char* cell_name(int cell) {
  switch (cell) {
    case kLSTM: return "lstm";
    case kReLU: return "relu";
    case kTanh: return "tanh";
    case kNormProp: return "normprop";
    default: return "trec";
  }
}

const char* dtype_name(int dtype) {
  return dtype == kBFloat16 ? "bfloat16" : (dtype == kFloat16 ? "float16" : "float32");
}

}  // namespace

int max_hidden(int cell, int dtype, int B, int device) {
  const Device d = query(device);
  if (!d.error.empty() || !d.coop) return 0;
  Plan p;
  int lo = 0, hi = 1 << 16;  // lo fits (or is 0), hi does not
  if (try_plan(cell, dtype, B, hi, d, device, 0, &p).empty()) return hi;
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (try_plan(cell, dtype, B, mid, d, device, 0, &p).empty()) lo = mid;
    else hi = mid;
  }
  return lo;
}

std::string make_plan(int cell, int dtype, int B, int H, int device, int units_override,
                      Plan* plan) {
  const Device d = query(device);
  if (!d.error.empty()) return d.error;
  if (!d.coop) return "device " + std::to_string(device) + " does not support cooperative launch";
  std::string why = try_plan(cell, dtype, B, H, d, device, units_override, plan);
  if (why.empty()) return why;
  const int hmax = max_hidden(cell, dtype, B, device);
  return std::string("the cuda backend cannot keep w_hh on chip for cell=") + cell_name(cell) +
         ", dtype=" + dtype_name(dtype) + ", H=" + std::to_string(H) +
         (units_override > 0 ? " with units per block forced to " + std::to_string(units_override)
                             : std::string()) +
         ": " + why + ". On this device (" + std::to_string(d.sms) + " SMs, " +
         std::to_string(d.smem_optin / 1024) + " KiB shared memory per block) this cell and "
         "dtype fit H <= " + std::to_string(hmax) +
         "; use backend='triton' or backend='reference' for larger H";
}

}  // namespace rnnreg

// Host interface of the Hopper cluster variant (cluster.cu: forward, cluster_backward.cu:
// backward): plans, arguments, launches.  Torch-free, like rnnreg_api.h (whose Scalars / dtype
// and cell codes it reuses).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "rnnreg_api.h"

namespace rnnreg {

// Cluster c (CTAs [c * csize, c * csize + csize) of the grid) runs batch rows
// [c * bs, c * bs + bs); its CTA of rank r owns hidden units [r * units, r * units + units).
struct ClusterPlan {
  int units = 0;     // hidden units per CTA (a multiple of 8)
  int csize = 0;     // CTAs per cluster (<= 8 portable, up to 16 non-portable on sm_90)
  int clusters = 0;  // clusters in the grid (batch slices)
  int bs = 0;        // batch rows per cluster
  size_t smem = 0;   // dynamic shared memory per CTA, bytes
};

struct ClusterFwdArgs {
  Scalars s;
  ClusterPlan plan;
  const void* x = nullptr;
  const void* w = nullptr;
  const void* h0 = nullptr;
  const void* c0 = nullptr;
  const void* mask = nullptr;
  const int64_t* lengths = nullptr;
  void* out = nullptr;
  void* hn = nullptr;
  void* cn = nullptr;
  float* norms = nullptr;
  float* sums = nullptr;   // [csize * clusters][3] weighted NS, TAR, AR terms per CTA
  float* hsave = nullptr;  // [T, B, H] (bf16/fp16 only)
  float* gates = nullptr;  // [T, B, 4H] (LSTM)
  float* cs = nullptr;     // [T, B, H] (LSTM)
};

inline size_t cluster_sums_floats(const ClusterPlan& p) { return 3 * (size_t)p.csize * p.clusters; }

// The plan for (cell, dtype, B, H) on `device`: "" on success, else why not (and which H fit).
// units_override > 0 forces the units per CTA (rounded up to a multiple of 8), csize_max > 0
// caps the cluster size (default 16, the non-portable maximum of sm_90).
std::string make_cluster_plan(int cell, int dtype, int B, int H, int device, int units_override,
                              int csize_max, ClusterPlan* plan);

// The largest H for which make_cluster_plan succeeds with the default split (0 if none).
int cluster_max_hidden(int cell, int dtype, int B, int device, int csize_max);

// One launch with cluster dimension plan.csize on `stream`: "" on success, else the error.
std::string launch_cluster_forward(int dtype, const ClusterFwdArgs& a, cudaStream_t stream);

// The kernel for a batch slice of `bs` rows: n8 tiles of batch rows one (bs <= 8) or two at a
// time (cluster_ntg); one instantiation for lstm, one for relu / tanh / trec.
int cluster_ntg(int bs);
const void* cluster_forward_kernel_ptr(int dtype, int bs, int cell);

// ----------------------------------------------------------------------------- backward
// The backward of the cluster variant (cluster_backward.cu), steps k = T..1 in one launch.
// Its plan has the forward's split (CTA r owns units [r*units, r*units + units)) but its own
// batch slice (its shared-memory layout differs).  Layouts as BwdArgs of rnnreg_api.h.
struct ClusterBwdArgs {
  Scalars s;
  ClusterPlan plan;
  const void* w = nullptr;         // [G*H, H]
  const void* h0 = nullptr;        // [B, H]
  const void* c0 = nullptr;        // [B, H] LSTM
  const void* mask = nullptr;      // [B, H] or null
  const int64_t* lengths = nullptr;
  const void* out = nullptr;       // forward output [T, B, H] (fp32: the states)
  const float* norms = nullptr;    // [T+1, B]
  const float* hsave = nullptr;    // [T, B, H] step-indexed fp32 states (bf16/fp16), or null
  const float* gates = nullptr;    // [T, B, 4H] LSTM
  const float* cs = nullptr;       // [T, B, H] LSTM
  const void* g_out = nullptr;     // [T, B, H]
  const void* g_hn = nullptr;      // [B, H]
  const void* g_cn = nullptr;      // [B, H] LSTM
  const float* g_terms = nullptr;  // [3]
  const float* g_norms = nullptr;  // [T+1, B] or null (zero)
  void* gx = nullptr;              // [T, B, G*H] time positions
  float* dz = nullptr;             // [T, B, G*H] step-indexed fp32 copy (bf16/fp16), or null
  void* gh0 = nullptr;             // [B, H]
  void* gc0 = nullptr;             // [B, H] LSTM
};

// The backward's plan (arguments as make_cluster_plan): "" or why not, naming the largest H.
std::string make_cluster_bwd_plan(int cell, int dtype, int B, int H, int device,
                                  int units_override, int csize_max, ClusterPlan* plan);
int cluster_bwd_max_hidden(int cell, int dtype, int B, int device, int csize_max);
std::string launch_cluster_backward(int dtype, const ClusterBwdArgs& a, cudaStream_t stream);
const void* cluster_backward_kernel_ptr(int dtype, int bs, int cell);

}  // namespace rnnreg

// Torch binding of the cluster variant (forward: cluster.cu, backward: cluster_backward.cu):
// checks, allocation, launch on PyTorch's current stream.  Registered into the extension
// module by binding.cpp (rnnreg_register_cluster).  The forward returns the saved tensors of
// the persistent forward (so either backward can follow it); the cluster backward takes them.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "cluster_api.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool cl_given(const OptTensor& t) { return t.has_value() && t->defined(); }

void cl_check(const Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
              const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, ": expected device ", device,
              " (the device of the other inputs), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (call .contiguous())");
}

int cl_dtype(at::ScalarType t) {
  if (t == at::kFloat) return rnnreg::kFloat32;
  if (t == at::kBFloat16) return rnnreg::kBFloat16;
  TORCH_CHECK(t == at::kHalf, "rnnreg cluster variant: expected dtype float32, bfloat16 or "
              "float16, got ", t);
  return rnnreg::kFloat16;
}

}  // namespace

// The scalars with their checks: binding.cpp (linked into the same extension).
rnnreg::Scalars scalars(int64_t T, int64_t B, int64_t H, int64_t cell, double theta, double w_ns,
                        double w_tar, double w_ar, bool incl, double ns_eps, bool reverse,
                        bool tf32, double h_scale, int64_t plant);

// "" when (cell, dtype code, B, H) runs in one cluster per batch slice on `device`.
static std::string cluster_plan(int64_t cell, int64_t dtype, int64_t B, int64_t H, int64_t device,
                                int64_t units, int64_t csize) {
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "dtype: expected a code 0..2, got ", dtype);
  TORCH_CHECK(B >= 1 && H >= 1, "expected B, H >= 1, got B=", B, ", H=", H);
  rnnreg::ClusterPlan p;
  return rnnreg::make_cluster_plan((int)cell, (int)dtype, (int)B, (int)H, (int)device, (int)units,
                                   (int)csize, &p);
}

static int64_t cluster_max_hidden(int64_t cell, int64_t dtype, int64_t device, int64_t csize) {
  return rnnreg::cluster_max_hidden((int)cell, (int)dtype, 1, (int)device, (int)csize);
}

// Returns [output, h_n, c_n, terms, norms, hsave, gates, cs] like binding.cpp's `forward`.
static std::vector<Tensor> cluster_forward(const Tensor& x, const Tensor& w, const Tensor& h0,
                                           const OptTensor& c0, const OptTensor& mask,
                                           const OptTensor& lengths, int64_t cell, double theta,
                                           double w_ns, double w_tar, double w_ar, bool incl,
                                           double ns_eps, bool reverse, bool tf32, int64_t units,
                                           int64_t csize, bool poison_outputs) {
  TORCH_CHECK(x.is_cuda(), "x_proj: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 3, "x_proj: expected [T, B, G*H], got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2, "w_hh: expected [G*H, H], got shape ", w.sizes());
  TORCH_CHECK(cell >= rnnreg::kLSTM && cell <= rnnreg::kTrec,
              "cell: the cluster variant takes codes 0..3 (lstm, relu, tanh, trec), got ", cell);
  TORCH_CHECK(ns_eps >= 0.0, "ns_eps: expected a non-negative number, got ", ns_eps);
  const int dtype = cl_dtype(x.scalar_type());
  const int64_t T = x.size(0), B = x.size(1), H = w.size(1);
  const int64_t G = rnnreg::gates_of((int)cell);
  const bool lstm = cell == rnnreg::kLSTM;
  TORCH_CHECK(T >= 1 && B >= 1 && H >= 1, "x_proj: expected T, B, H >= 1, got T=", T, ", B=", B,
              ", H=", H);
  TORCH_CHECK(T <= std::numeric_limits<int>::max() / 2 &&
                  B * G * H <= std::numeric_limits<int>::max(),
              "x_proj: sizes too large for the cluster variant (T=", T, ", B=", B, ", G*H=", G * H,
              ")");
  const auto dev = x.device();
  const auto st = x.scalar_type();
  cl_check(x, "x_proj", {T, B, G * H}, st, dev);
  cl_check(w, "w_hh", {G * H, H}, st, dev);
  cl_check(h0, "h0", {B, H}, st, dev);
  TORCH_CHECK(cl_given(c0) == lstm, "c0: ", lstm ? "required for the lstm cell, got None"
                                                 : "expected None (only used for the lstm cell)");
  if (lstm) cl_check(*c0, "c0", {B, H}, st, dev);
  if (cl_given(mask)) cl_check(*mask, "ar_mask", {B, H}, st, dev);
  if (cl_given(lengths)) cl_check(*lengths, "lengths", {B}, at::kLong, dev);

  c10::cuda::CUDAGuard guard(dev);
  rnnreg::ClusterPlan p;
  const std::string why = rnnreg::make_cluster_plan((int)cell, dtype, (int)B, (int)H, dev.index(),
                                                    (int)units, (int)csize, &p);
  TORCH_CHECK(why.empty(), why);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor out = at::empty({T, B, H}, x.options());
  Tensor hn = at::empty({B, H}, x.options());
  Tensor cn = lstm ? at::empty({B, H}, x.options()) : Tensor();
  Tensor norms = at::empty({T + 1, B}, f32);
  Tensor sums = at::empty({(int64_t)rnnreg::cluster_sums_floats(p)}, f32);
  Tensor hsave = dtype != rnnreg::kFloat32 ? at::empty({T, B, H}, f32) : Tensor();
  Tensor gates = lstm ? at::empty({T, B, 4 * H}, f32) : Tensor();
  Tensor cs = lstm ? at::empty({T, B, H}, f32) : Tensor();
  if (poison_outputs)
    for (Tensor* t : {&out, &hn, &cn, &norms, &sums, &hsave, &gates, &cs})
      if (t->defined()) t->fill_(std::numeric_limits<float>::quiet_NaN());

  rnnreg::ClusterFwdArgs a;
  a.s = scalars(T, B, H, cell, theta, w_ns, w_tar, w_ar, incl, ns_eps, reverse, tf32, 1.0, 0);
  a.plan = p;
  a.x = x.data_ptr();
  a.w = w.data_ptr();
  a.h0 = h0.data_ptr();
  a.c0 = lstm ? c0->data_ptr() : nullptr;
  a.mask = cl_given(mask) ? mask->data_ptr() : nullptr;
  a.lengths = cl_given(lengths) ? lengths->data_ptr<int64_t>() : nullptr;
  a.out = out.data_ptr();
  a.hn = hn.data_ptr();
  a.cn = lstm ? cn.data_ptr() : nullptr;
  a.norms = norms.data_ptr<float>();
  a.sums = sums.data_ptr<float>();
  a.hsave = hsave.defined() ? hsave.data_ptr<float>() : nullptr;
  a.gates = lstm ? gates.data_ptr<float>() : nullptr;
  a.cs = lstm ? cs.data_ptr<float>() : nullptr;
  const std::string err = rnnreg::launch_cluster_forward(
      dtype, a, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err.empty(), err);
  // terms = the sum over the CTAs of their weighted terms (on the device, no host copy).
  Tensor terms = sums.view({-1, 3}).sum(0);
  return {out, hn, cn, terms, norms, hsave, gates, cs};
}

// "" when the cluster backward runs (cell, dtype code, B, H) on `device`, else why not.
static std::string cluster_bwd_plan(int64_t cell, int64_t dtype, int64_t B, int64_t H,
                                    int64_t device, int64_t units, int64_t csize) {
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "dtype: expected a code 0..2, got ", dtype);
  TORCH_CHECK(B >= 1 && H >= 1, "expected B, H >= 1, got B=", B, ", H=", H);
  rnnreg::ClusterPlan p;
  return rnnreg::make_cluster_bwd_plan((int)cell, (int)dtype, (int)B, (int)H, (int)device,
                                       (int)units, (int)csize, &p);
}

static int64_t cluster_bwd_max_hidden(int64_t cell, int64_t dtype, int64_t device,
                                      int64_t csize) {
  return rnnreg::cluster_bwd_max_hidden((int)cell, (int)dtype, 1, (int)device, (int)csize);
}

// Returns [grad_x_proj, grad_h0, grad_c0, dz] (grad_c0 None unless lstm; dz, the step-indexed
// float32 copy of grad_x_proj for the grad_w_hh GEMM, only for bfloat16/float16), like
// binding.cpp's `backward` without the normprop / cell-norm outputs the variant refuses.
static std::vector<Tensor> cluster_backward(
    const Tensor& w, const Tensor& h0, const OptTensor& c0, const OptTensor& mask,
    const OptTensor& lengths, const Tensor& out, const Tensor& norms, const OptTensor& hsave,
    const OptTensor& gates, const OptTensor& cs, const Tensor& g_out, const Tensor& g_hn,
    const OptTensor& g_cn, const Tensor& g_terms, const OptTensor& g_norms, int64_t cell,
    double theta, double w_ns, double w_tar, double w_ar, bool incl, double ns_eps, bool reverse,
    bool tf32, int64_t units, int64_t csize, bool poison_outputs) {
  TORCH_CHECK(out.is_cuda(), "output: expected a CUDA tensor, got device ", out.device());
  TORCH_CHECK(out.dim() == 3, "output: expected [T, B, H], got shape ", out.sizes());
  TORCH_CHECK(w.dim() == 2, "w_hh: expected [G*H, H], got shape ", w.sizes());
  TORCH_CHECK(cell >= rnnreg::kLSTM && cell <= rnnreg::kTrec,
              "cell: the cluster variant takes codes 0..3 (lstm, relu, tanh, trec), got ", cell);
  TORCH_CHECK(ns_eps >= 0.0, "ns_eps: expected a non-negative number, got ", ns_eps);
  const int dtype = cl_dtype(out.scalar_type());
  const int64_t T = out.size(0), B = out.size(1), H = out.size(2);
  const int64_t G = rnnreg::gates_of((int)cell);
  const bool lstm = cell == rnnreg::kLSTM, half = dtype != rnnreg::kFloat32;
  TORCH_CHECK(T >= 1 && B >= 1 && H >= 1, "output: expected T, B, H >= 1, got T=", T, ", B=", B,
              ", H=", H);
  TORCH_CHECK(T <= std::numeric_limits<int>::max() / 2 &&
                  B * G * H <= std::numeric_limits<int>::max(),
              "output: sizes too large for the cluster variant (T=", T, ", B=", B, ", G*H=",
              G * H, ")");
  const auto dev = out.device();
  const auto st = out.scalar_type();
  cl_check(w, "w_hh", {G * H, H}, st, dev);
  cl_check(h0, "h0", {B, H}, st, dev);
  TORCH_CHECK(cl_given(c0) == lstm, "c0: ", lstm ? "required for the lstm cell, got None"
                                                 : "expected None (only used for the lstm cell)");
  if (lstm) cl_check(*c0, "c0", {B, H}, st, dev);
  if (cl_given(mask)) cl_check(*mask, "ar_mask", {B, H}, st, dev);
  if (cl_given(lengths)) cl_check(*lengths, "lengths", {B}, at::kLong, dev);
  cl_check(norms, "norms", {T + 1, B}, at::kFloat, dev);
  if (cl_given(g_norms)) cl_check(*g_norms, "grad_norms", {T + 1, B}, at::kFloat, dev);
  TORCH_CHECK(cl_given(hsave) == half, "saved h (float32 states): ",
              half ? "required for bfloat16/float16, got None" : "expected None for float32");
  if (half) cl_check(*hsave, "saved h (float32 states)", {T, B, H}, at::kFloat, dev);
  TORCH_CHECK(cl_given(gates) == lstm && cl_given(cs) == lstm, "saved gates / cell states: ",
              lstm ? "required for the lstm cell, got None"
                   : "expected None (only used for the lstm cell)");
  if (lstm) {
    cl_check(*gates, "saved gates", {T, B, 4 * H}, at::kFloat, dev);
    cl_check(*cs, "saved cell states", {T, B, H}, at::kFloat, dev);
  }
  cl_check(g_out, "grad_output", {T, B, H}, st, dev);
  cl_check(g_hn, "grad_h_n", {B, H}, st, dev);
  TORCH_CHECK(cl_given(g_cn) == lstm, "grad_c_n: ",
              lstm ? "required for the lstm cell, got None"
                   : "expected None (only used for the lstm cell)");
  if (lstm) cl_check(*g_cn, "grad_c_n", {B, H}, st, dev);
  cl_check(g_terms, "grad_terms", {3}, at::kFloat, dev);

  c10::cuda::CUDAGuard guard(dev);
  rnnreg::ClusterPlan p;
  const std::string why = rnnreg::make_cluster_bwd_plan((int)cell, dtype, (int)B, (int)H,
                                                        dev.index(), (int)units, (int)csize, &p);
  TORCH_CHECK(why.empty(), why);
  Tensor gx = at::empty({T, B, G * H}, out.options());
  Tensor gh0 = at::empty({B, H}, out.options());
  Tensor gc0 = lstm ? at::empty({B, H}, out.options()) : Tensor();
  Tensor dz = half ? at::empty({T, B, G * H}, out.options().dtype(at::kFloat)) : Tensor();
  if (poison_outputs)
    for (Tensor* t : {&gx, &gh0, &gc0, &dz})
      if (t->defined()) t->fill_(std::numeric_limits<float>::quiet_NaN());

  rnnreg::ClusterBwdArgs a;
  a.s = scalars(T, B, H, cell, theta, w_ns, w_tar, w_ar, incl, ns_eps, reverse, tf32, 1.0, 0);
  a.plan = p;
  a.w = w.data_ptr();
  a.h0 = h0.data_ptr();
  a.c0 = lstm ? c0->data_ptr() : nullptr;
  a.mask = cl_given(mask) ? mask->data_ptr() : nullptr;
  a.lengths = cl_given(lengths) ? lengths->data_ptr<int64_t>() : nullptr;
  a.out = out.data_ptr();
  a.norms = norms.data_ptr<float>();
  a.hsave = half ? hsave->data_ptr<float>() : nullptr;
  a.gates = lstm ? gates->data_ptr<float>() : nullptr;
  a.cs = lstm ? cs->data_ptr<float>() : nullptr;
  a.g_out = g_out.data_ptr();
  a.g_hn = g_hn.data_ptr();
  a.g_cn = lstm ? g_cn->data_ptr() : nullptr;
  a.g_terms = g_terms.data_ptr<float>();
  a.g_norms = cl_given(g_norms) ? g_norms->data_ptr<float>() : nullptr;
  a.gx = gx.data_ptr();
  a.dz = half ? dz.data_ptr<float>() : nullptr;
  a.gh0 = gh0.data_ptr();
  a.gc0 = lstm ? gc0.data_ptr() : nullptr;
  const std::string err = rnnreg::launch_cluster_backward(
      dtype, a, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err.empty(), err);
  return {gx, gh0, gc0, dz};
}

void rnnreg_register_cluster(pybind11::module_& m) {
  m.def("cluster_plan", &cluster_plan,
        "\"\" when (cell, dtype code, B, H) runs on the cluster variant on device, else why not",
        py::arg("cell"), py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("device"),
        py::arg("units") = 0, py::arg("csize") = 0);
  m.def("cluster_max_hidden", &cluster_max_hidden,
        "largest H that fits one cluster for (cell, dtype code) on device", py::arg("cell"),
        py::arg("dtype"), py::arg("device"), py::arg("csize") = 0);
  m.def("cluster_forward", &cluster_forward,
        "recurrence forward on thread-block clusters (one launch, sm_90)");
  m.def("cluster_bwd_plan", &cluster_bwd_plan,
        "\"\" when the cluster backward runs (cell, dtype code, B, H) on device, else why not",
        py::arg("cell"), py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("device"),
        py::arg("units") = 0, py::arg("csize") = 0);
  m.def("cluster_bwd_max_hidden", &cluster_bwd_max_hidden,
        "largest H the cluster backward fits for (cell, dtype code) on device", py::arg("cell"),
        py::arg("dtype"), py::arg("device"), py::arg("csize") = 0);
  m.def("cluster_backward", &cluster_backward,
        "recurrence backward on thread-block clusters (one launch, sm_90; no grad_w_hh)");
}

// Torch binding of the persistent CUDA kernels: argument checks, allocation, dtype dispatch,
// launch on PyTorch's current stream.  No autograd here (rnnreg_kernels/ops.py owns it) and no
// kernels (forward.cu / backward.cu, torch-free).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "rnnreg_api.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return rnnreg::kFloat32;
    case at::kBFloat16: return rnnreg::kBFloat16;
    case at::kHalf: return rnnreg::kFloat16;
    default:
      TORCH_CHECK(false, "rnnreg cuda backend: expected dtype float32, bfloat16 or float16, got ",
                  t, "; use backend='reference' for other dtypes");
  }
  return -1;
}

void check(const Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
           const at::Device& device) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.device() == device, name, ": expected device ", device,
              " (the device of the other inputs), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (call .contiguous())");
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

const void* ptr(const OptTensor& t) { return given(t) ? t->data_ptr() : nullptr; }

// A tensor that must be given exactly when `required` (e.g. c0 for the lstm cell only).
void check_opt(const OptTensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
               const at::Device& device, bool required, const char* when) {
  TORCH_CHECK(given(t) || !required, name, ": required ", when, ", got None");
  TORCH_CHECK(!given(t) || required, name, ": expected None (only used ", when, "), got a tensor");
  if (given(t)) check(*t, name, shape, dtype, device);
}

// A tensor that may be None (ar_mask, lengths).
void check_maybe(const OptTensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                 const at::Device& device) {
  if (given(t)) check(*t, name, shape, dtype, device);
}

rnnreg::Plan plan_or_throw(const rnnreg::Scalars& s, int dtype, int device, int64_t units) {
  rnnreg::Plan p;
  const std::string why = rnnreg::make_plan(s.cell, dtype, s.B, s.H, device, (int)units, &p);
  TORCH_CHECK(why.empty(), why);
  return p;
}

void poison(const std::vector<Tensor>& ts) {
  for (const auto& t : ts)
    if (t.defined()) t.fill_(std::numeric_limits<float>::quiet_NaN());
}

}  // namespace

// The kernels' scalars with their checks; also called by cluster_binding.cpp (one extension).
rnnreg::Scalars scalars(int64_t T, int64_t B, int64_t H, int64_t cell, double theta, double w_ns,
                        double w_tar, double w_ar, bool incl, double ns_eps, bool reverse,
                        bool tf32, double h_scale, int64_t plant) {
  TORCH_CHECK(cell >= rnnreg::kLSTM && cell <= rnnreg::kNormProp,
              "cell: expected a code 0..4 (lstm, relu, tanh, trec, normprop), got ", cell);
  TORCH_CHECK(cell == rnnreg::kNormProp || h_scale == 1.0,
              "h_scale: expected 1.0 for every cell but normprop, got ", h_scale);
  TORCH_CHECK(T >= 1 && B >= 1 && H >= 1, "x_proj: expected T, B, H >= 1, got T=", T, ", B=", B,
              ", H=", H);
  const int64_t G = rnnreg::gates_of((int)cell);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(T <= kIntMax / 2 && B * G * H <= kIntMax,
              "x_proj: sizes too large for the cuda backend (T=", T, ", B=", B, ", G*H=", G * H,
              "; the limits are T <= 2^30 - 1 and B*G*H <= 2^31 - 1)");
  TORCH_CHECK(ns_eps >= 0.0, "ns_eps: expected a non-negative number, got ", ns_eps);
#ifndef RNNREG_PLANT_BUG
  TORCH_CHECK(plant == 0, "plant: planted bugs exist only in a build with -DRNNREG_PLANT_BUG, got ",
              plant);
#endif
  rnnreg::Scalars s;
  s.T = (int)T;
  s.B = (int)B;
  s.H = (int)H;
  s.cell = (int)cell;
  s.theta = (float)theta;
  s.w_ns = (float)w_ns;
  s.w_tar = (float)w_tar;
  s.w_ar = (float)w_ar;
  s.heps = (float)((double)H * ns_eps);
  s.ns_include_initial = incl ? 1 : 0;
  s.reverse = reverse ? 1 : 0;
  s.tf32 = tf32 ? 1 : 0;
  s.h_scale = (float)h_scale;
  s.plant = (int)plant;
  return s;
}

// "" when (cell, dtype, B, H) runs on `device` (units > 0 forces the units per block).
std::string plan(int64_t cell, int64_t dtype, int64_t B, int64_t H, int64_t device, int64_t units) {
  TORCH_CHECK(cell >= 0 && cell <= 4, "cell: expected a code 0..4, got ", cell);
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "dtype: expected a code 0..2, got ", dtype);
  TORCH_CHECK(B >= 1 && H >= 1, "expected B, H >= 1, got B=", B, ", H=", H);
  rnnreg::Plan p;
  return rnnreg::make_plan((int)cell, (int)dtype, (int)B, (int)H, (int)device, (int)units, &p);
}

int64_t max_hidden(int64_t cell, int64_t dtype, int64_t device) {
  return rnnreg::max_hidden((int)cell, (int)dtype, 1, (int)device);
}

// Returns [output, h_n, c_n, terms, norms, cell_norms, hsave, gates, cs] (None where absent).
std::vector<Tensor> forward(const Tensor& x, const Tensor& w, const Tensor& h0, const OptTensor& c0,
                            const OptTensor& mask, const OptTensor& lengths,
                            const OptTensor& cell_scale, double h_scale, bool cell_norms,
                            int64_t cell, double theta, double w_ns, double w_tar, double w_ar,
                            bool incl, double ns_eps, bool reverse, bool tf32, int64_t units,
                            bool poison_outputs, int64_t plant) {
  TORCH_CHECK(x.is_cuda(), "x_proj: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 3, "x_proj: expected [T, B, G*H], got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2, "w_hh: expected [G*H, H], got shape ", w.sizes());
  const int dtype = dtype_code(x.scalar_type());
  const int64_t T = x.size(0), B = x.size(1), H = w.size(1);
  const rnnreg::Scalars s = scalars(T, B, H, cell, theta, w_ns, w_tar, w_ar, incl, ns_eps, reverse,
                                    tf32, h_scale, plant);
  const int64_t G = rnnreg::gates_of(s.cell);
  const bool lstm = rnnreg::has_cell_state(s.cell);
  const bool np = s.cell == rnnreg::kNormProp;
  const auto dev = x.device();
  const auto st = x.scalar_type();
  check(x, "x_proj", {T, B, G * H}, st, dev);
  check(w, "w_hh", {G * H, H}, st, dev);
  check(h0, "h0", {B, H}, st, dev);
  check_opt(c0, "c0", {B, H}, st, dev, lstm, "for the lstm and normprop cells");
  check_maybe(mask, "ar_mask", {B, H}, st, dev);
  check_maybe(lengths, "lengths", {B}, at::kLong, dev);
  check_opt(cell_scale, "cell_scale", {H}, at::kFloat, dev, np, "for the normprop cell");
  TORCH_CHECK(!cell_norms || lstm,
              "cell_norms: only the lstm and normprop cells have a cell state, got cell code ",
              cell);

  c10::cuda::CUDAGuard guard(dev);
  const rnnreg::Plan p = plan_or_throw(s, dtype, dev.index(), units);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor out = at::empty({T, B, H}, x.options());
  Tensor hn = at::empty({B, H}, x.options());
  Tensor cn = lstm ? at::empty({B, H}, x.options()) : Tensor();
  Tensor norms = at::empty({T + 1, B}, f32);
  Tensor cnorms = cell_norms ? at::empty({T + 1, B}, f32) : Tensor();
  Tensor terms = at::empty({3}, f32);
  Tensor hsave = dtype != rnnreg::kFloat32 ? at::empty({T, B, H}, f32) : Tensor();
  Tensor gates = lstm ? at::empty({T, B, 4 * H}, f32) : Tensor();
  Tensor cs = lstm ? at::empty({T, B, H}, f32) : Tensor();
  Tensor scratch = at::empty({(int64_t)rnnreg::fwd_scratch_floats((int)B, (int)H, p.blocks)}, f32);
  if (poison_outputs) poison({out, hn, cn, norms, cnorms, terms, hsave, gates, cs, scratch});

  rnnreg::FwdArgs a;
  a.s = s;
  a.plan = p;
  a.x = x.data_ptr();
  a.w = w.data_ptr();
  a.h0 = h0.data_ptr();
  a.c0 = ptr(c0);
  a.mask = ptr(mask);
  a.lengths = given(lengths) ? lengths->data_ptr<int64_t>() : nullptr;
  a.cell_scale = static_cast<const float*>(ptr(cell_scale));
  a.out = out.data_ptr();
  a.hn = hn.data_ptr();
  a.cn = lstm ? cn.data_ptr() : nullptr;
  a.norms = norms.data_ptr<float>();
  a.cnorms = cnorms.defined() ? cnorms.data_ptr<float>() : nullptr;
  a.terms = terms.data_ptr<float>();
  a.hsave = hsave.defined() ? hsave.data_ptr<float>() : nullptr;
  a.gates = lstm ? gates.data_ptr<float>() : nullptr;
  a.cs = lstm ? cs.data_ptr<float>() : nullptr;
  a.scratch = scratch.data_ptr<float>();
  const std::string err =
      rnnreg::launch_forward(dtype, a, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err.empty(), err);
  return {out, hn, cn, terms, norms, cnorms, hsave, gates, cs};
}

// Returns [grad_x_proj, grad_h0, grad_c0, grad_cell_scale, dz] (grad_c0 None unless the cell has a
// cell state; grad_cell_scale [H] float32 for normprop only; dz, the step-indexed float32 copy of
// grad_x_proj, only when hsave is given, i.e. for bfloat16/float16).  g_norms / g_cnorms may be
// None (zero); cnorms is needed with g_cnorms.
std::vector<Tensor> backward(const Tensor& w, const Tensor& h0, const OptTensor& c0,
                             const OptTensor& mask, const OptTensor& lengths,
                             const OptTensor& cell_scale, double h_scale, const Tensor& out,
                             const Tensor& norms, const OptTensor& cnorms, const OptTensor& hsave,
                             const OptTensor& gates, const OptTensor& cs, const Tensor& g_out,
                             const Tensor& g_hn, const OptTensor& g_cn, const Tensor& g_terms,
                             const OptTensor& g_norms, const OptTensor& g_cnorms, int64_t cell,
                             double theta, double w_ns, double w_tar, double w_ar, bool incl,
                             double ns_eps, bool reverse, bool tf32, int64_t units,
                             bool poison_outputs, int64_t plant) {
  TORCH_CHECK(out.is_cuda(), "output: expected a CUDA tensor, got device ", out.device());
  TORCH_CHECK(out.dim() == 3, "output: expected [T, B, H], got shape ", out.sizes());
  const int dtype = dtype_code(out.scalar_type());
  const int64_t T = out.size(0), B = out.size(1), H = out.size(2);
  const rnnreg::Scalars s = scalars(T, B, H, cell, theta, w_ns, w_tar, w_ar, incl, ns_eps, reverse,
                                    tf32, h_scale, plant);
  const int64_t G = rnnreg::gates_of(s.cell);
  const bool lstm = rnnreg::has_cell_state(s.cell);
  const bool np = s.cell == rnnreg::kNormProp;
  const bool half = dtype != rnnreg::kFloat32;
  const auto dev = out.device();
  const auto st = out.scalar_type();
  check(w, "w_hh", {G * H, H}, st, dev);
  check(h0, "h0", {B, H}, st, dev);
  check_opt(c0, "c0", {B, H}, st, dev, lstm, "for the lstm and normprop cells");
  check_maybe(mask, "ar_mask", {B, H}, st, dev);
  check_maybe(lengths, "lengths", {B}, at::kLong, dev);
  check_opt(cell_scale, "cell_scale", {H}, at::kFloat, dev, np, "for the normprop cell");
  check(norms, "norms", {T + 1, B}, at::kFloat, dev);
  check_maybe(g_norms, "grad_norms", {T + 1, B}, at::kFloat, dev);
  TORCH_CHECK(!given(g_cnorms) || lstm,
              "grad_cell_norms: only the lstm and normprop cells have cell norms, got cell code ",
              cell);
  check_maybe(g_cnorms, "grad_cell_norms", {T + 1, B}, at::kFloat, dev);
  TORCH_CHECK(given(cnorms) || !given(g_cnorms),
              "cell_norms: required with grad_cell_norms (the forward's cell_norms), got None");
  check_maybe(cnorms, "cell_norms", {T + 1, B}, at::kFloat, dev);
  check_opt(hsave, "saved h (float32 states)", {T, B, H}, at::kFloat, dev, half,
            "for bfloat16/float16");
  check_opt(gates, "saved gates", {T, B, 4 * H}, at::kFloat, dev, lstm,
            "for the lstm and normprop cells");
  check_opt(cs, "saved cell states", {T, B, H}, at::kFloat, dev, lstm,
            "for the lstm and normprop cells");
  check(g_out, "grad_output", {T, B, H}, st, dev);
  check(g_hn, "grad_h_n", {B, H}, st, dev);
  check_opt(g_cn, "grad_c_n", {B, H}, st, dev, lstm, "for the lstm and normprop cells");
  check(g_terms, "grad_terms", {3}, at::kFloat, dev);

  c10::cuda::CUDAGuard guard(dev);
  const rnnreg::Plan p = plan_or_throw(s, dtype, dev.index(), units);
  const auto f32 = out.options().dtype(at::kFloat);
  Tensor gx = at::empty({T, B, G * H}, out.options());
  Tensor gh0 = at::empty({B, H}, out.options());
  Tensor gc0 = lstm ? at::empty({B, H}, out.options()) : Tensor();
  Tensor gcs = np ? at::empty({H}, f32) : Tensor();
  Tensor dz = half ? at::empty({T, B, G * H}, f32) : Tensor();
  Tensor scratch = at::empty({(int64_t)rnnreg::bwd_scratch_floats((int)B, (int)H, (int)G)}, f32);
  if (poison_outputs) poison({gx, gh0, gc0, gcs, dz, scratch});

  rnnreg::BwdArgs a;
  a.s = s;
  a.plan = p;
  a.w = w.data_ptr();
  a.h0 = h0.data_ptr();
  a.c0 = ptr(c0);
  a.mask = ptr(mask);
  a.lengths = given(lengths) ? lengths->data_ptr<int64_t>() : nullptr;
  a.cell_scale = static_cast<const float*>(ptr(cell_scale));
  a.out = out.data_ptr();
  a.norms = norms.data_ptr<float>();
  a.cnorms = given(g_cnorms) ? static_cast<const float*>(ptr(cnorms)) : nullptr;
  a.hsave = static_cast<const float*>(ptr(hsave));
  a.gates = static_cast<const float*>(ptr(gates));
  a.cs = static_cast<const float*>(ptr(cs));
  a.g_out = g_out.data_ptr();
  a.g_hn = g_hn.data_ptr();
  a.g_cn = ptr(g_cn);
  a.g_terms = g_terms.data_ptr<float>();
  a.g_norms = static_cast<const float*>(ptr(g_norms));
  a.g_cnorms = static_cast<const float*>(ptr(g_cnorms));
  a.gx = gx.data_ptr();
  a.dz = dz.defined() ? dz.data_ptr<float>() : nullptr;
  a.gh0 = gh0.data_ptr();
  a.gc0 = lstm ? gc0.data_ptr() : nullptr;
  a.gcs = np ? gcs.data_ptr<float>() : nullptr;
  a.scratch = scratch.data_ptr<float>();
  const std::string err =
      rnnreg::launch_backward(dtype, a, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err.empty(), err);
  return {gx, gh0, gc0, gcs, dz};
}

// The Hopper cluster variant of the forward (cluster_binding.cpp).
void rnnreg_register_cluster(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnnreg_kernels CUDA backend: persistent cooperative recurrence kernels";
  m.def("plan", &plan, "\"\" when (cell, dtype code, B, H) fits on device, else why not",
        py::arg("cell"), py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("device"),
        py::arg("units") = 0);
  m.def("max_hidden", &max_hidden, "largest H that fits for (cell, dtype code) on device",
        py::arg("cell"), py::arg("dtype"), py::arg("device"));
  m.def("forward", &forward, "recurrence forward (one cooperative launch)");
  m.def("backward", &backward, "recurrence backward (one cooperative launch, no grad_w_hh)");
  rnnreg_register_cluster(m);
#ifdef RNNREG_PLANT_BUG
  m.attr("PLANTED") = true;
#else
  m.attr("PLANTED") = false;
#endif
}

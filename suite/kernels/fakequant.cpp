// Fused fake quantization with one scalar step size s (suite/qat.py, _ScalarStepQuant).
//
// Each element goes through the same IEEE float operations, in the same order, as the
// autograd graph of suite.qat.ste_quant (clip_ste, round_ste, a broadcast s), so results and
// gradients are bit-identical to it; the build must not contract a*b+c into an FMA
// (-ffp-contract=off). What this saves is memory traffic: one pass forward and one backward
// instead of a chain of full-size temporaries.
//
//   v = (gamma x) / s, m = [alpha < v < beta], v_bar = nearbyint(clamp(v, alpha, beta))
//   forward   LSQ: s v_bar                Eq. 13: v_bar / gamma
//   backward  g_v = (g s) m (LSQ) or (g / gamma) m (Eq. 13)
//             dx = (g_v / s) gamma        (the gamma multiply skipped when gamma = 1)
//             ds (per element, summed by the caller in a fixed order):
//                 LSQ: g v_bar + (-g_v) ((gamma x / s) / s)   Eq. 13: (-g_v) ((gamma x / s) / s)
#include <torch/extension.h>

#include <cmath>

namespace {

inline float clampf(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }

// The loops are templates on the branches so that each compiles to straight vector code.
template <bool LSQ>
void forward_loop(const float* x, float* out, int64_t n, float s, float a, float b, float g) {
  for (int64_t i = 0; i < n; ++i) {
    const float vb = std::nearbyint(clampf((g * x[i]) / s, a, b));
    out[i] = LSQ ? s * vb : vb / g;
  }
}

template <bool LSQ, bool DX, bool DS>
void backward_loop(const float* grad, const float* x, float* dx, float* ds, int64_t n, float s,
                   float a, float b, float g) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = g * x[i], v = t / s;
    const float m = (v > a && v < b) ? 1.0f : 0.0f;
    const float gv = (LSQ ? grad[i] * s : grad[i] / g) * m;
    if (DX) dx[i] = LSQ ? gv / s : (gv / s) * g;  // (LSQ's gamma is 1: autograd's x 1 is exact)
    if (DS) {
      const float through_v = (-gv) * ((t / s) / s);
      ds[i] = LSQ ? grad[i] * std::nearbyint(clampf(v, a, b)) + through_v : through_v;
    }
  }
}

void check(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(),
              what, " must be a contiguous float32 CPU tensor");
}

torch::Tensor forward(torch::Tensor x, double s, int64_t alpha, int64_t beta, int64_t gamma,
                      bool lsq) {
  check(x, "x");
  auto out = torch::empty_like(x);
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const auto f = lsq ? forward_loop<true> : forward_loop<false>;
  at::parallel_for(0, x.numel(), 16384, [&](int64_t lo, int64_t hi) {
    f(px + lo, po + lo, hi - lo, static_cast<float>(s), alpha, beta, gamma);
  });
  return out;
}

using BackwardLoop = void (*)(const float*, const float*, float*, float*, int64_t, float, float,
                              float, float);

BackwardLoop pick(bool lsq, bool dx, bool ds) {
  static const BackwardLoop loops[8] = {
      backward_loop<false, false, false>, backward_loop<false, false, true>,
      backward_loop<false, true, false>,  backward_loop<false, true, true>,
      backward_loop<true, false, false>,  backward_loop<true, false, true>,
      backward_loop<true, true, false>,   backward_loop<true, true, true>};
  return loops[4 * lsq + 2 * dx + ds];
}

std::vector<torch::Tensor> backward(torch::Tensor grad, torch::Tensor x, double s, int64_t alpha,
                                    int64_t beta, int64_t gamma, bool lsq, bool need_x,
                                    bool need_s) {
  check(x, "x");
  check(grad, "grad");
  auto dx = need_x ? torch::empty_like(x) : torch::Tensor();
  auto ds = need_s ? torch::empty_like(x) : torch::Tensor();
  const float* px = x.data_ptr<float>();
  const float* pg = grad.data_ptr<float>();
  float* pdx = need_x ? dx.data_ptr<float>() : nullptr;
  float* pds = need_s ? ds.data_ptr<float>() : nullptr;
  const BackwardLoop f = pick(lsq, need_x, need_s);
  at::parallel_for(0, x.numel(), 16384, [&](int64_t lo, int64_t hi) {
    f(pg + lo, px + lo, pdx ? pdx + lo : nullptr, pds ? pds + lo : nullptr, hi - lo,
      static_cast<float>(s), alpha, beta, gamma);
  });
  return {dx, ds};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused scalar-step fake quantization");
  m.def("backward", &backward, "its STE gradients (dx, per-element ds)");
}

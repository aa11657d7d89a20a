// One step of decoupleQ's range-shrink search (methods/decoupleq.py, shrink_errors): the RTN
// codes of W on the shrunk grid (s, z), and how they moved since the previous step.
//
// Per element, the same IEEE operations in the same order as the torch code it replaces
// (suite.primitives.quantize_signed on per-column s, z; then float64 dV = S1 (q - q_prev),
// V += dV), built with -ffp-contract=off: Q, V and dV are bit-identical to it
// (tests/test_shrink.py). It also returns dV's nonzeros as CSR arrays (row-major, columns
// ascending: what Tensor.to_sparse_csr gives), so the caller's sparse product is unchanged.
//
//   s' = s with |s| >= 1e-15 (sign kept), x = (w - z) / s', q = clamp(round(x), alpha, beta)
//   round: half-up (ties towards +inf, as suite.primitives.round_half_up) or half-even
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

inline float code_of(float w, float s, float z, float lo, float hi, bool half_up) {
  const float sc = s < 0.0f ? std::min(s, -1e-15f) : std::max(s, 1e-15f);
  const float x = (w - z) / sc;
  float y = std::nearbyint(x);
  if (half_up && std::fabs(y - x) == 0.5f) y = std::nearbyint(x + 0.5f);
  return std::min(std::max(y, lo), hi);
}

// W (rows, cols) float32; s, z (rows, G) float32 with G = cols / g; Q, S1, V, dV (rows, cols)
// float64, Q, V and dV written in place. Returns (crow, col, val) of dV's nonzeros.
std::vector<torch::Tensor> shrink_step(torch::Tensor W, torch::Tensor s, torch::Tensor z,
                                       int64_t g, double lo, double hi, bool half_up,
                                       torch::Tensor Q, torch::Tensor S1, torch::Tensor V,
                                       torch::Tensor dV) {
  for (const auto* t : {&W, &s, &z}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->device().is_cpu(),
                "shrink_step: W, s, z must be contiguous float32 CPU tensors");
  }
  for (const auto* t : {&Q, &S1, &V, &dV}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat64 && t->is_contiguous() &&
                    t->sizes() == W.sizes(),
                "shrink_step: Q, S1, V, dV must be contiguous float64 tensors shaped like W");
  }
  const int64_t rows = W.size(0), cols = W.size(1), G = cols / g;
  TORCH_CHECK(G * g == cols && s.size(0) == rows && s.size(1) == G && z.sizes() == s.sizes(),
              "shrink_step: s and z must be (rows, cols / g)");
  const float *w = W.data_ptr<float>(), *sp = s.data_ptr<float>(), *zp = z.data_ptr<float>();
  double *q = Q.data_ptr<double>(), *s1 = S1.data_ptr<double>(), *v = V.data_ptr<double>(),
         *dv = dV.data_ptr<double>();
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  auto crow = torch::zeros({rows + 1}, torch::kInt64);
  int64_t* nnz = crow.data_ptr<int64_t>() + 1;  // per-row counts, then prefix sums
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t count = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t i = r * cols + c, k = r * G + c / g;
        const double qn = static_cast<double>(code_of(w[i], sp[k], zp[k], flo, fhi, half_up));
        const double d = s1[i] * (qn - q[i]);
        dv[i] = d;
        v[i] = v[i] + d;
        q[i] = qn;
        count += d != 0.0;
      }
      nnz[r] = count;
    }
  });
  for (int64_t r = 0; r < rows; ++r) nnz[r] += nnz[r - 1];
  const int64_t total = nnz[rows - 1];
  auto col = torch::empty({total}, torch::kInt64);
  auto val = torch::empty({total}, torch::kFloat64);
  int64_t* cp = col.data_ptr<int64_t>();
  double* vp = val.data_ptr<double>();
  const int64_t* start = crow.data_ptr<int64_t>();
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t o = start[r];
      for (int64_t c = 0; c < cols; ++c) {
        const double d = dv[r * cols + c];
        if (d != 0.0) {
          cp[o] = c;
          vp[o++] = d;
        }
      }
    }
  });
  return {crow, col, val};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shrink_step", &shrink_step, "RTN codes on a shrunk grid and their change, in place");
}

// One lazy block of the GPTQ column sweep (Frantar et al. 2023, Algorithm 1), shared by GPTQ
// (baselines/gptq.py) and decoupleQ's integer solver (methods/decoupleq.py, gptq_round).
//
// Inside a block the rows are independent: row r's column j is rounded on its grid, its
// error e = (w - w_hat) / U[j, j] is recorded, and w[r, j:] -= e U[j, j:]. So the kernel runs
// the block row by row (contiguous, split over threads; the split cannot change a row). Each
// element goes through the same IEEE float operations in the same order as the Python loop it
// replaces, and the build must not contract a*b+c into an FMA (-ffp-contract=off): results
// are bit-identical to that loop (tests/test_sweep.py).
//
//   integer-zero grid (GPTQ):  q = clamp(nearbyint(w / s) + z, 0, maxq)   w_hat = s (q - z)
//   float-offset grid (decoupleQ):  s' = s clamped away from 0 (|s| >= 1e-15, sign kept),
//       q = clamp(round((w - z) / s'), alpha, beta), round = half-up or half-even,
//       w_hat = s q + z
//   loss[r] += (((w - w_hat)^2) / d^2) / 2, with d = U[j, j]      (GPTQ's running loss)
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>

namespace {

inline float clampf(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }

// torch.round (half to even) and decoupleQ's my_round (ties towards +inf), as
// suite.primitives.round_half_up computes it: ties are moved up, nothing else changes.
inline float round_even(float x) { return std::nearbyint(x); }
inline float round_up(float x) {
  const float y = std::nearbyint(x);
  return std::fabs(y - x) == 0.5f ? std::nearbyint(x + 0.5f) : y;
}

template <bool FLOAT_OFFSET, bool HALF_UP>
void sweep_row(float* w, const float* s, const float* z, const float* U, float* q, float* e,
               float* loss, int64_t B, float lo, float hi) {
  for (int64_t j = 0; j < B; ++j) {
    const float wj = w[j];
    float code, what;
    if (FLOAT_OFFSET) {
      const float sc = s[j] < 0.0f ? std::min(s[j], -1e-15f) : std::max(s[j], 1e-15f);
      const float x = (wj - z[j]) / sc;
      code = clampf(HALF_UP ? round_up(x) : round_even(x), lo, hi);
      what = s[j] * code + z[j];
    } else {
      code = clampf(round_even(wj / s[j]) + z[j], lo, hi);
      what = s[j] * (code - z[j]);
    }
    q[j] = code;
    const float d = U[j * B + j];
    const float r = wj - what;
    *loss = *loss + ((r * r) / (d * d)) / 2.0f;
    const float err = r / d;
    e[j] = err;
    for (int64_t k = j; k < B; ++k) w[k] = w[k] - err * U[j * B + k];
  }
}

// W1, S, Z, Q, E: (rows, B) contiguous float32; U1: (B, B); loss: (rows,). W1, Q, E and loss
// are written in place.
void sweep_block(torch::Tensor W1, torch::Tensor S, torch::Tensor Z, torch::Tensor U1,
                 torch::Tensor Q, torch::Tensor E, torch::Tensor loss, bool float_offset,
                 bool half_up, double lo, double hi) {
  for (const auto* t : {&W1, &S, &Z, &U1, &Q, &E, &loss}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->device().is_cpu(),
                "sweep_block: contiguous float32 CPU tensors only");
  }
  const int64_t rows = W1.size(0), B = W1.size(1);
  TORCH_CHECK(U1.size(0) == B && U1.size(1) == B && S.sizes() == W1.sizes() &&
                  Z.sizes() == W1.sizes() && Q.sizes() == W1.sizes() && E.sizes() == W1.sizes() &&
                  loss.size(0) == rows,
              "sweep_block: shapes do not match");
  float *w = W1.data_ptr<float>(), *q = Q.data_ptr<float>(), *e = E.data_ptr<float>();
  const float *s = S.data_ptr<float>(), *z = Z.data_ptr<float>(), *u = U1.data_ptr<float>();
  float* l = loss.data_ptr<float>();
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * B;
      if (!float_offset) {
        sweep_row<false, false>(w + o, s + o, z + o, u, q + o, e + o, l + r, B, flo, fhi);
      } else if (half_up) {
        sweep_row<true, true>(w + o, s + o, z + o, u, q + o, e + o, l + r, B, flo, fhi);
      } else {
        sweep_row<true, false>(w + o, s + o, z + o, u, q + o, e + o, l + r, B, flo, fhi);
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sweep_block", &sweep_block, "one lazy block of the GPTQ column sweep, in place");
}

// Weight-only low-bit GEMM for CPU: y[m, r] = sum_c x[m, c] * (scale[r, j] * q[r, c] + offset[r, j])
// with j = c / group, q packed densely per row (LSB first, `bits` in 2..8). Part of qbench
// (suite/kernels/cpu.py compiles it with torch.utils.cpp_extension). Rows are split across
// threads; each thread unpacks one row into a float buffer (L1-resident for rows up to ~8K
// columns) and takes its dot product with every activation row, using precomputed group sums
// of x for the offset term. The unpack loops are written so compilers vectorise them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

inline void unpack_tail(const uint8_t* p, int64_t bits, int64_t from, int64_t cols,
                        int64_t row_bytes, float* q) {
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t c = from; c < cols; ++c) {  // a bit reader: any width, any position
    const int64_t bit = bits * c, byte = bit / 8;
    uint32_t w = p[byte];
    if (byte + 1 < row_bytes) w |= static_cast<uint32_t>(p[byte + 1]) << 8;
    q[c] = static_cast<float>((w >> (bit % 8)) & mask);
  }
}

inline void unpack_row(const uint8_t* p, int64_t bits, int64_t cols, int64_t row_bytes,
                       float* q) {
  int64_t done = 0;
  if (bits == 8) {
    for (int64_t c = 0; c < cols; ++c) q[c] = static_cast<float>(p[c]);
    done = cols;
  } else if (bits == 4) {
    for (int64_t i = 0; i < cols / 2; ++i) {
      const uint8_t b = p[i];
      q[2 * i] = static_cast<float>(b & 15);
      q[2 * i + 1] = static_cast<float>(b >> 4);
    }
    done = cols / 2 * 2;
  } else if (bits == 2) {
    for (int64_t i = 0; i < cols / 4; ++i) {
      const uint8_t b = p[i];
      q[4 * i] = static_cast<float>(b & 3);
      q[4 * i + 1] = static_cast<float>((b >> 2) & 3);
      q[4 * i + 2] = static_cast<float>((b >> 4) & 3);
      q[4 * i + 3] = static_cast<float>(b >> 6);
    }
    done = cols / 4 * 4;
  } else if (bits == 3) {
    for (int64_t i = 0; i < cols / 8; ++i) {  // 8 codes in 3 bytes
      const uint32_t w = p[3 * i] | (p[3 * i + 1] << 8) | (p[3 * i + 2] << 16);
      for (int k = 0; k < 8; ++k) q[8 * i + k] = static_cast<float>((w >> (3 * k)) & 7u);
    }
    done = cols / 8 * 8;
  }
  unpack_tail(p, bits, done, cols, row_bytes, q);
}

}  // namespace

// One GEMM problem: the checked, contiguous inputs, the group sums of x and the output.
struct Problem {
  torch::Tensor x, codes, scale, offset, xsum, out;
  int64_t M, cols, rows, row_bytes, groups, group, bits;

  Problem(torch::Tensor x_, torch::Tensor codes_, torch::Tensor scale_, torch::Tensor offset_,
          int64_t bits_, int64_t group_)
      : x(x_.contiguous()), codes(codes_.contiguous()), scale(scale_.contiguous()),
        offset(offset_.contiguous()), group(group_), bits(bits_) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x: float32 (M, cols)");
    TORCH_CHECK(codes.dtype() == torch::kUInt8, "codes: uint8");
    M = x.size(0), cols = x.size(1), rows = codes.size(0), row_bytes = codes.size(1);
    groups = cols / group;
    TORCH_CHECK(groups * group == cols && scale.size(0) == rows && scale.size(1) == groups,
                "scale: (rows, cols / group)");
    xsum = x.reshape({M, groups, group}).sum(-1).contiguous();  // (M, groups)
    out = torch::empty({M, rows}, x.options());
  }
  const uint8_t* row(int64_t r) const { return codes.data_ptr<uint8_t>() + r * row_bytes; }

  // out[:, r] from row r's codes unpacked into the float buffer q (cols values)
  void row_dots(int64_t r, const float* q) const {
    const float* xp = x.data_ptr<float>();
    const float* xs = xsum.data_ptr<float>();
    const float* sr = scale.data_ptr<float>() + r * groups;
    const float* orow = offset.data_ptr<float>() + r * groups;
    float* yp = out.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xp + m * cols;
      float acc = 0.f;
      for (int64_t j = 0; j < groups; ++j) {
        const float* qj = q + j * group;
        const float* xj = xm + j * group;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < group; ++k) dot += qj[k] * xj[k];
        acc += sr[j] * dot + orow[j] * xs[m * groups + j];
      }
      yp[m * rows + r] = acc;
    }
  }

  // unpack(row bytes, q) per row, then row_dots, rows split across threads
  template <typename Unpack>
  torch::Tensor run(Unpack unpack) const {
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      std::vector<float> q(cols);
      for (int64_t r = r0; r < r1; ++r) {
        unpack(row(r), q.data());
        row_dots(r, q.data());
      }
    });
    return out;
  }
};

torch::Tensor qgemm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale,
                    torch::Tensor offset, int64_t bits, int64_t group) {
  const Problem p(x, packed, scale, offset, bits, group);
  return p.run([&](const uint8_t* row, float* q) {
    unpack_row(row, p.bits, p.cols, p.row_bytes, q);
  });
}

// --- row-planar layout (cols % 8 == 0): the layout the fast path reads --------------------
// With Q = cols / 4 and E = cols / 8, one row is stored as
//   4-bit: cols/2 bytes, byte i = c[i] | c[i + cols/2] << 4
//   2-bit: Q bytes, byte i = c[i] | c[i+Q] << 2 | c[i+2Q] << 4 | c[i+3Q] << 6
//   3-bit: the 2-bit plane of the low bits (Q bytes), then E bytes of high bits, bit k of
//          byte i = c[i + k E] >> 2
//   8-bit: cols bytes as is
// (b bits per code, as dense packing). Every unpack loop is a long straight loop over
// contiguous bytes, so compilers vectorise it; the row then lives in an L1-resident float
// buffer for the group-wise dot products.

inline void unpack_planar(const uint8_t* p, int64_t bits, int64_t cols, float* q) {
  if (bits == 8) {
#pragma omp simd
    for (int64_t i = 0; i < cols; ++i) q[i] = static_cast<float>(p[i]);
  } else if (bits == 4) {
    const int64_t h = cols / 2;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) q[i] = static_cast<float>(p[i] & 15);
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) q[i + h] = static_cast<float>(p[i] >> 4);
  } else {
    const int64_t Q = cols / 4;
    for (int s = 0; s < 4; ++s) {
      float* qs = q + s * Q;
#pragma omp simd
      for (int64_t i = 0; i < Q; ++i) qs[i] = static_cast<float>((p[i] >> (2 * s)) & 3);
    }
    if (bits == 3) {
      const int64_t E = cols / 8;
      const uint8_t* hp = p + Q;
      for (int k = 0; k < 8; ++k) {
        float* qk = q + k * E;
#pragma omp simd
        for (int64_t i = 0; i < E; ++i) qk[i] += static_cast<float>(((hp[i] >> k) & 1) << 2);
      }
    }
  }
}

#ifdef __AVX2__
// GEMV (M = 1) on the row-planar layout with AVX2: one group at a time, its g codes read from
// the plane that holds them (a nibble / 2-bit field / high bit of contiguous bytes), widened
// to 8 x int32, converted and FMA'd against x, 8 columns per step. Needs g % 8 == 0 and every
// plane's width (cols/2, cols/4, cols/8) divisible by g, so a group never straddles planes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i load8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// Columns [c0, c0 + n) that lie in ONE plane of width `width` (n % 8 == 0).
inline __m256 range_dot(const uint8_t* row, int64_t bits, int64_t cols, int64_t c0, int64_t n,
                        const float* x, __m256 acc) {
  if (bits == 8) {
    for (int64_t k = 0; k < n; k += 8)
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load8(row + c0 + k)), _mm256_loadu_ps(x + c0 + k), acc);
    return acc;
  }
  if (bits == 4) {
    const int64_t h = cols / 2, plane = c0 / h, off = c0 - plane * h;
    const __m256i m15 = _mm256_set1_epi32(15);
    const __m128i sh = _mm_cvtsi32_si128(static_cast<int>(4 * plane));
    for (int64_t k = 0; k < n; k += 8) {
      __m256i v = _mm256_and_si256(_mm256_srl_epi32(load8(row + off + k), sh), m15);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(x + c0 + k), acc);
    }
    return acc;
  }
  const int64_t Q = cols / 4, plane = c0 / Q, off = c0 - plane * Q;
  const __m256i m3 = _mm256_set1_epi32(3), one = _mm256_set1_epi32(1);
  const __m128i sh = _mm_cvtsi32_si128(static_cast<int>(2 * plane));
  const int64_t E = cols / 8, hplane = c0 / E, hoff = c0 - hplane * E;
  const __m128i hsh = _mm_cvtsi32_si128(static_cast<int>(hplane));
  const uint8_t* hp = row + Q;
  for (int64_t k = 0; k < n; k += 8) {
    __m256i v = _mm256_and_si256(_mm256_srl_epi32(load8(row + off + k), sh), m3);
    if (bits == 3) {
      __m256i hb = _mm256_and_si256(_mm256_srl_epi32(load8(hp + hoff + k), hsh), one);
      v = _mm256_or_si256(v, _mm256_slli_epi32(hb, 2));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(x + c0 + k), acc);
  }
  return acc;
}

inline int64_t plane_width(int64_t bits, int64_t cols) {
  return bits == 8 ? cols : bits == 4 ? cols / 2 : bits == 2 ? cols / 4 : cols / 8;
}

// The dot product of x with the group's codes, [c0, c0 + g), split where it crosses a plane
// boundary (for 3-bit the finest planes are the high-bit ones, cols / 8 wide).
inline float group_dot(const uint8_t* row, int64_t bits, int64_t cols, int64_t c0, int64_t g,
                       const float* x) {
  const int64_t w = plane_width(bits, cols);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t a = c0; a < c0 + g;) {
    const int64_t b = std::min(c0 + g, (a / w + 1) * w);
    acc = range_dot(row, bits, cols, a, b - a, x, acc);
    a = b;
  }
  return hsum(acc);
}

inline bool avx2_ok(int64_t bits, int64_t cols, int64_t g) {
  // every plane boundary and group boundary on a multiple of 8 columns
  return g % 8 == 0 && cols % 64 == 0 && (bits == 2 || bits == 3 || bits == 4 || bits == 8);
}
#endif

torch::Tensor qgemm_planar(torch::Tensor x, torch::Tensor planar, torch::Tensor scale,
                           torch::Tensor offset, int64_t bits, int64_t group) {
  const Problem p(x, planar, scale, offset, bits, group);
  TORCH_CHECK(p.cols % 8 == 0 && p.row_bytes * 8 == p.cols * bits,
              "planar: (rows, cols * bits / 8) with cols % 8 == 0");
#ifdef __AVX2__
  if (p.M == 1 && avx2_ok(bits, p.cols, group)) {
    const float* xp = p.x.data_ptr<float>();
    const float* xs = p.xsum.data_ptr<float>();
    const float* sp = p.scale.data_ptr<float>();
    const float* op = p.offset.data_ptr<float>();
    float* yp = p.out.data_ptr<float>();
    at::parallel_for(0, p.rows, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float acc = 0.f;
        for (int64_t j = 0; j < p.groups; ++j)
          acc += sp[r * p.groups + j] * group_dot(p.row(r), bits, p.cols, j * group, group, xp) +
                 op[r * p.groups + j] * xs[j];
        yp[r] = acc;
      }
    });
    return p.out;
  }
#endif
  return p.run([&](const uint8_t* row, float* q) { unpack_planar(row, p.bits, p.cols, q); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemm", &qgemm, "weight-only low-bit GEMM (packed codes, group scale/offset)");
  m.def("qgemm_planar", &qgemm_planar, "the same on the row-planar layout (fast path)");
}

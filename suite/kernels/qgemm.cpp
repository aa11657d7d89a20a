// Weight-only low-bit GEMM for CPU: y[m, r] = sum_c x[m, c] * (scale[r, j] * q[r, c] + offset[r, j])
// with j = c / group and b-bit codes q (b in 2..8). Part of qbench (suite/kernels/cpu.py
// compiles it with torch.utils.cpp_extension). The kernels:
//   * qgemm / qgemm_planar (backend `cpp`): exact float32. Rows are split across threads;
//     codes are converted to float (an AVX2 GEMV on the row-planar layout, or a row unpacked
//     into an L1-resident buffer) and FMA'd with x, the offset term from group sums of x.
//   * qgemm_int (backend `cpp-i16`, below): exact integer products of the codes with x
//     rounded to 16-bit fixed point once per call; dequant_int turns rows of the same storage
//     into float32 for the large-M path (cpu.py: tiles times torch's float32 GEMM).
//   * qgemm_lut (backend `cpp-lut`): 2/3/4-bit codes as bit planes, table lookups (AVX2).
//   * qgemm_vnni (backend `cpp-vnni`): 2/3/4-bit codes times split activations with vpdpbusd
//     (AVX-512 VNNI); the same integer sums as qgemm_lut.
//   * qgemm_a8 (backend `cpp-a8`): 2/3/4-bit codes times activations rounded to int8 per 32
//     columns (vpdpbusd with AVX-512 VNNI, else vpmaddubsw): a W4A8-style product, not
//     weight-only; cpu.py bounds its error.
// stream_read is the benchmark's read-bandwidth probe.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#include <type_traits>
#include <utility>

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
          int64_t bits_, int64_t group_, bool with_xsum = true)
      : x(x_.contiguous()), codes(codes_.contiguous()), scale(scale_.contiguous()),
        offset(offset_.contiguous()), group(group_), bits(bits_) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x: float32 (M, cols)");
    TORCH_CHECK(codes.dtype() == torch::kUInt8, "codes: uint8");
    M = x.size(0), cols = x.size(1), rows = codes.size(0), row_bytes = codes.size(1);
    groups = cols / group;
    TORCH_CHECK(groups * group == cols && scale.size(0) == rows && scale.size(1) == groups,
                "scale: (rows, cols / group)");
    if (with_xsum) xsum = x.reshape({M, groups, group}).sum(-1).contiguous();  // (M, groups)
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

// --- integer path: 16-bit fixed-point activations, exact integer dot products --------------
// The float path above is bound by widening and converting every code to float. Here each
// activation row is rounded once per call to X = round(x / d) in int16 (d = max |x| / 32639
// over a segment of S <= 256 columns), and the codes are multiplied as integers with
// vpmaddwd (16 products of 16-bit numbers, summed in pairs into int32): weights exact,
// activation error at most d / 2 per element (Python states the bound and the tests check it).
//
// Offsets may be float32 or uint8 zero points (offset = -scale * zero). Rows are split across
// threads; each row is reduced 8 segments at a time and the rows ahead are prefetched.
//
// "Unit" layout, 64 columns per unit, lane L of 32-column chunk k = column 32 k + L:
//   8-bit: 64 bytes as is.  4-bit: 32 bytes, byte p = c[p] | c[32 + p] << 4.
//   2-bit: 16 bytes, byte p = c[p] | c[16 + p] << 2 | c[32 + p] << 4 | c[48 + p] << 6.
//   3-bit: the 2-bit unit of the low bits (16 bytes), then 8 bytes of high bits,
//          bit b of byte p = c[8 b + p] >> 2.
// vpunpck{l,h}bw widen a chunk's 32 byte lanes to 16-bit as lanes [0-7, 16-23] and
// [8-15, 24-31], so X is stored in that order within each 32-column chunk.
#ifdef __AVX2__
namespace ipath {

constexpr int64_t kUnit = 64;
constexpr int kChunkOrder[32] = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23,
                                 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};

constexpr int64_t unit_bytes(int bits) { return bits == 8 ? 64 : bits == 4 ? 32 : bits == 3 ? 24 : 16; }

// The 32 codes of chunk K (0 or 1) of the unit at u, one per byte lane.
template <int BITS, int K>
inline __m256i chunk(const uint8_t* u) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 32 * K));
  } else if constexpr (BITS == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u));
    return _mm256_and_si256(K ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
  } else {
    // low 2 bits: both 128-bit halves hold the 16 bytes; dwords of the low half shift by
    // 4K, of the high half by 4K + 2 (lanes 16..31 are columns 16..31 of the chunk)
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)));
    const __m256i cnt = _mm256_setr_epi32(4 * K, 4 * K, 4 * K, 4 * K, 4 * K + 2, 4 * K + 2, 4 * K + 2, 4 * K + 2);
    __m256i v = _mm256_and_si256(_mm256_srlv_epi32(b, cnt), _mm256_set1_epi8(3));
    if constexpr (BITS == 3) {  // qword i of the chunk (lanes 8i..8i+7) takes bit 4K + i:
      // shifted to bit 7 of its byte, it selects v | 4 over v
      int64_t hw;
      std::memcpy(&hw, u + 16, 8);
      const __m256i h = _mm256_set1_epi64x(hw);
      const __m256i hc = _mm256_setr_epi64x(7 - 4 * K, 6 - 4 * K, 5 - 4 * K, 4 - 4 * K);
      v = _mm256_blendv_epi8(v, _mm256_or_si256(v, _mm256_set1_epi8(4)), _mm256_sllv_epi64(h, hc));
    }
    return v;
  }
}

template <int BITS>
inline __m256i chunk_at(const uint8_t* u, int k) {  // runtime chunk index (uncommon segments)
  return k ? chunk<BITS, 1>(u) : chunk<BITS, 0>(u);
}

// One activation row rounded to int16 per segment (in chunk order), with the step d and the
// sum of the rounded x per segment (for the offset term), so the product is exactly
// w . (d X) up to float rounding. (Splitting X into two int8 limbs for vpmaddubsw was
// measured slower on the 2-vCPU AMD EPYC this was tuned on.)
constexpr float kLevels = 32639.f;

template <typename T>
struct QuantXT {
  std::vector<T> X;
  std::vector<float> d, xs;
};
using QuantX = QuantXT<int16_t>;
inline void quantize_row(const float* x, int64_t cols, int64_t seg, QuantX& q) {
  q.X.resize(cols), q.d.resize(cols / seg), q.xs.resize(cols / seg);
  for (int64_t s0 = 0; s0 < cols; s0 += seg) {
    float amax = 0.f;
    for (int64_t c = s0; c < s0 + seg; ++c) amax = std::max(amax, std::fabs(x[c]));
    const float inv = amax > 0.f ? kLevels / amax : 0.f;
    int64_t sum = 0;  // the offset term sees the same rounded x as the codes: d * sum(X)
    for (int64_t c0 = s0; c0 < s0 + seg; c0 += 32)
      for (int j = 0; j < 32; ++j) {
        const auto v = static_cast<int16_t>(std::nearbyint(x[c0 + kChunkOrder[j]] * inv));
        q.X[c0 + j] = v, sum += v;
      }
    q.d[s0 / seg] = amax / kLevels;
    q.xs[s0 / seg] = q.d[s0 / seg] * static_cast<float>(sum);
  }
}

// acc += codes (32 byte lanes) . X[c .. c + 32), widened to int16, vpmaddwd into int32
inline __m256i mac(__m256i acc, __m256i v, const int16_t* X) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X));
  const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X + 16));
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_unpacklo_epi8(v, zero), xa));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_unpackhi_epi8(v, zero), xb));
}

// The integer sum of segment [c0, c0 + seg) of one row (c0, seg multiples of 32).
template <int BITS, typename QX>
inline __m256i segment_sum(const uint8_t* row, const QX& q, int64_t c0, int64_t seg) {
  __m256i acc = _mm256_setzero_si256();
  for (int64_t c = c0; c < c0 + seg; c += 32)
    acc = mac(acc, chunk_at<BITS>(row + c / kUnit * unit_bytes(BITS), static_cast<int>((c / 32) & 1)),
              q.X.data() + c);
  return acc;
}

// The same with the segment length SEG known at compile time; chunk K of unit c0 / 64 when
// SEG == 32 (c0 is then 32 mod 64 exactly when K == 1).
template <int BITS, int SEG, int K = 0, typename QX>
inline __m256i segment_sum(const uint8_t* row, const QX& q, int64_t c0) {
  __m256i acc = _mm256_setzero_si256();
  if constexpr (SEG == 32) {
    return mac(acc, chunk<BITS, K>(row + c0 / kUnit * unit_bytes(BITS)), q.X.data() + c0);
  } else {
    for (int64_t c = c0; c < c0 + SEG; c += 64) {
      const uint8_t* u = row + c / kUnit * unit_bytes(BITS);
      acc = mac(acc, chunk<BITS, 0>(u), q.X.data() + c);
      acc = mac(acc, chunk<BITS, 1>(u), q.X.data() + c + 32);
    }
    return acc;
  }
}

// Lane k = the sum of the 8 lanes of a[k]: the transposed reduction of 8 accumulators.
inline __m256i reduce8(const __m256i* a) {
  const __m256i h01 = _mm256_hadd_epi32(a[0], a[1]), h23 = _mm256_hadd_epi32(a[2], a[3]);
  const __m256i h45 = _mm256_hadd_epi32(a[4], a[5]), h67 = _mm256_hadd_epi32(a[6], a[7]);
  const __m256i q0 = _mm256_hadd_epi32(h01, h23), q1 = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20),
                          _mm256_permute2x128_si256(q0, q1, 0x31));
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

inline int pow2_shift(int64_t n) { return (n & (n - 1)) == 0 ? __builtin_ctzll(static_cast<uint64_t>(n)) : -1; }

// Per-segment parameters of a row: scale and offset of segment k's group; the offset is
// -scale * zero when integer zero points (uint8) are stored instead of float offsets.
struct RowParams {
  const float* scale;    // (groups,) of this row
  const float* offset;   // (groups,) or nullptr
  const uint8_t* zero;   // (groups,) or nullptr
  int64_t per_group;     // segments per group (1 when seg == group)
  int shift;             // log2(per_group) when a power of two, else -1 (then a division)
  int64_t gi(int64_t k) const { return shift >= 0 ? k >> shift : k / per_group; }
  float s(int64_t k) const { return scale[gi(k)]; }
  float o(int64_t k) const {
    return zero ? -scale[gi(k)] * static_cast<float>(zero[gi(k)]) : offset[gi(k)];
  }
  // Segments k .. k + 7 (k a multiple of 8) read groups k / P .. (k + 7) / P. For P = 2 or 4
  // the 8 / P groups are loaded once and spread over the lanes (a permute); for P a multiple
  // of 8 one group covers all 8 lanes (a broadcast). Other P take the scalar path (a division
  // per lane: it made cpp-a8 at g64, P = 2, twice as slow).
  __m256i spread_idx() const {
    return per_group == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                          : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  }
  bool spreads() const { return per_group == 2 || per_group == 4; }
  // the 8 / P group values from p (P = 2: 4 floats; P = 4: 2 floats, read as 8 bytes, so
  // nothing past the row's last group is read)
  __m256 spread_ps(const float* p) const {
    const __m128 v = per_group == 2 ? _mm_loadu_ps(p)
                                    : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), spread_idx());
  }
  bool broadcasts() const { return per_group % 8 == 0; }
  __m256 s8(int64_t k) const {
    if (per_group == 1) return _mm256_loadu_ps(scale + k);
    if (broadcasts()) return _mm256_set1_ps(scale[gi(k)]);
    if (spreads()) return spread_ps(scale + gi(k));
    return _mm256_setr_ps(s(k), s(k + 1), s(k + 2), s(k + 3), s(k + 4), s(k + 5), s(k + 6), s(k + 7));
  }
  __m256 o8(int64_t k, __m256 s8k) const {
    if (per_group != 1 && !broadcasts() && !spreads())
      return _mm256_setr_ps(o(k), o(k + 1), o(k + 2), o(k + 3), o(k + 4), o(k + 5), o(k + 6), o(k + 7));
    if (!zero) {
      if (per_group == 1) return _mm256_loadu_ps(offset + k);
      if (broadcasts()) return _mm256_set1_ps(offset[gi(k)]);
      return spread_ps(offset + gi(k));
    }
    __m256i z;
    if (per_group == 1) {
      z = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zero + k)));
    } else if (broadcasts()) {
      z = _mm256_set1_epi32(zero[gi(k)]);
    } else {  // 4 (P = 2) or 2 (P = 4) zero points, widened, then spread like the scales
      int32_t four = 0;  // constant sizes: a runtime-sized memcpy is a library call
      if (per_group == 2) std::memcpy(&four, zero + gi(k), 4);
      else std::memcpy(&four, zero + gi(k), 2);
      z = _mm256_permutevar8x32_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi32_si128(four)), spread_idx());
    }
    return _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), s8k), _mm256_cvtepi32_ps(z));
  }
};

// y = sum over segments k of scale * d[k] * (integer sum of segment k) + offset * xs[k], one
// row: 8 segments at a time, their 8 integer sums reduced into the lanes of one vector.
template <int BITS, int SEG, typename QX>
float row_dot(const uint8_t* row, const RowParams& rp, const QX& q, int64_t cols, int64_t seg,
              int64_t ahead) {
  const int64_t nseg = cols / seg;
  __m256 facc = _mm256_setzero_ps();
  int64_t k = 0;
  if constexpr (SEG > 0) {
    constexpr int64_t block_bytes = 8 * SEG / kUnit * unit_bytes(BITS) > 0 ? 8 * SEG / kUnit * unit_bytes(BITS) : 1;
    for (; k + 8 <= nseg; k += 8) {
      if (ahead) {  // software prefetch of the same block `ahead` bytes further on
        const uint8_t* pf = row + k / 8 * block_bytes + ahead;
        for (int64_t b = 0; b < block_bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + b), _MM_HINT_T0);
      }
      __m256i acc[8];
      for (int i = 0; i < 8; i += 2) {  // k is a multiple of 8: segment k + i has parity i
        acc[i] = segment_sum<BITS, SEG, 0, QX>(row, q, (k + i) * SEG);
        acc[i + 1] = segment_sum<BITS, SEG, 1, QX>(row, q, (k + i + 1) * SEG);
      }
      const __m256 s8k = rp.s8(k);
      const __m256 sd = _mm256_mul_ps(s8k, _mm256_loadu_ps(q.d.data() + k));
      facc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(acc)), sd, facc);
      facc = _mm256_fmadd_ps(rp.o8(k, s8k), _mm256_loadu_ps(q.xs.data() + k), facc);
    }
  }
  float y = ::hsum(facc);
  for (; k < nseg; ++k) {  // the remaining (or, for uncommon segment lengths, all) segments
    const int32_t sum = hsum_i32(segment_sum<BITS, QX>(row, q, k * seg, seg));
    y += rp.s(k) * q.d[k] * static_cast<float>(sum) + rp.o(k) * q.xs[k];
  }
  return y;
}

constexpr int64_t kAheadRows = 4;

template <int BITS, int SEG, typename QX>
void run_rows(const Problem& P, const std::vector<QX>& qx, int64_t seg, int64_t r0, int64_t r1) {
  const uint8_t* codes = P.codes.data_ptr<uint8_t>();
  float* out = P.out.data_ptr<float>();
  for (int64_t r = r0; r < r1; ++r) {
    const bool z = P.offset.scalar_type() == torch::kUInt8;
    const RowParams rp{P.scale.data_ptr<float>() + r * P.groups,
                       z ? nullptr : P.offset.data_ptr<float>() + r * P.groups,
                       z ? P.offset.data_ptr<uint8_t>() + r * P.groups : nullptr, P.group / seg,
                       pow2_shift(P.group / seg)};
    for (int64_t m = 0; m < P.M; ++m)
      out[m * P.rows + r] = row_dot<BITS, SEG, QX>(codes + r * P.row_bytes, rp, qx[m], P.cols, seg,
                                               r + kAheadRows < r1 && m == 0 ? kAheadRows * P.row_bytes : 0);
  }
}

// Segment lengths 32, 64, 128 and 256 get a compile-time inner loop; others (96, 160, ...)
// take the generic one.
template <int BITS>
void run_rows_any(const Problem& P, const std::vector<QuantX>& qx, int64_t seg, int64_t r0,
                  int64_t r1) {
  switch (seg) {
    case 32: run_rows<BITS, 32>(P, qx, seg, r0, r1); break;
    case 64: run_rows<BITS, 64>(P, qx, seg, r0, r1); break;
    case 128: run_rows<BITS, 128>(P, qx, seg, r0, r1); break;
    case 256: run_rows<BITS, 256>(P, qx, seg, r0, r1); break;
    default: run_rows<BITS, 0>(P, qx, seg, r0, r1);
  }
}

// Rows [r0, r1) dequantized to float32, s * q + offset per group, from the unit layout: the
// large-M path (cpu.py multiplies such tiles with torch's float32 GEMM, so the decode is paid
// once per weight element instead of once per activation row).
template <int BITS>
void dequant_rows(const uint8_t* codes, int64_t row_bytes, const float* scale, const float* offset,
                  const uint8_t* zero, int64_t groups, int64_t group, int64_t cols, int64_t r0,
                  int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = codes + r * row_bytes;
    float* o = out + (r - r0) * cols;
    for (int64_t c = 0; c < cols; c += 32) {  // chunk c / 32: columns c .. c + 31 in lane order
      const __m256i v = chunk_at<BITS>(row + c / kUnit * unit_bytes(BITS), static_cast<int>((c / 32) & 1));
      const int64_t j = r * groups + c / group;
      const __m256 s = _mm256_set1_ps(scale[j]);
      const __m256 b = _mm256_set1_ps(zero ? -scale[j] * static_cast<float>(zero[j]) : offset[j]);
      const __m128i half[2] = {_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)};
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e) {
          const __m256i q = _mm256_cvtepu8_epi32(e ? _mm_srli_si128(half[h], 8) : half[h]);
          _mm256_storeu_ps(o + c + 16 * h + 8 * e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, b));
        }
    }
  }
}

}  // namespace ipath
#endif

#ifdef __AVX2__
// --- backend `cpp-a8`: codes times int8 activations, llama.cpp's Q8_0 dot product ---------
// Per 32-column segment k of an activation row: X = round(x / d_k), d_k = max |x| / 127, and
//   y_r = sum_g s_rg sum_{k in g} d_k (q_r . X)_k + sum_g o_rg XS_g,   XS_g = sum_{k in g} d_k sum X_k
// The integer product of one segment is dot32 (vpdpbusd, or vpmaddubsw + vpmaddwd without
// VNNI; codes unsigned, X signed); it is converted
// and FMA'd with d_k into a per-group float accumulator (no horizontal reduction per
// segment), which is scaled by s_rg once per group. Four rows share each activation load
// and d_k broadcast; their offset terms o_rg XS_g add up in the lanes of one 128-bit vector.
namespace a8 {

using ipath::kUnit;
using ipath::unit_bytes;

// The activation row rounded as above, with XS per group (the offset term's sums).
struct Act {
  std::vector<int8_t> X;
  std::vector<float> d, XS;
};

inline Act quantize(const float* x, int64_t cols, int64_t group) {
  Act a;
  a.X.resize(cols), a.d.resize(cols / 32), a.XS.assign(cols / group, 0.f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
  for (int64_t k = 0; k < cols / 32; ++k) {
    __m256 v[4], m = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j)
      v[j] = _mm256_loadu_ps(x + 32 * k + 8 * j), m = _mm256_max_ps(m, _mm256_and_ps(v[j], abs_mask));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i q[4];  // round to nearest even, as nearbyint: |X| <= 127
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.X.data() + 32 * k), _mm256_permutevar8x32_epi32(b, order));
    const int32_t sum = ipath::hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    a.d[k] = amax / 127.f;
    a.XS[32 * k / group] += a.d[k] * static_cast<float>(sum);
  }
  return a;
}

// int32 lanes summing to codes . X over one 32-column chunk, lane i = the products of bytes
// 4i .. 4i + 3 (unsigned codes times signed X). With AVX-512 VNNI one vpdpbusd; otherwise
// vpmaddubsw sums adjacent products into int16, |.| <= 2 * 15 * 127 for codes of at most 4 bits
// (no saturation), and vpmaddwd with ones into int32. Both give the same integers.
// -DQBENCH_A8_NO_VNNI forces the second form (benchmarks/ab_a8_dot.py times one against the
// other).
inline __m256i dot32(__m256i v, const int8_t* X) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && !defined(QBENCH_A8_NO_VNNI)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), v, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(v, x), _mm256_set1_epi16(1));
#endif
}

// The storage of backend `cpp-a8` (cpu.to_a8, cpu.by_four_rows): cpp-i16's units with rows in
// blocks of 4, the block's 4 units of each 64 columns side by side (unit u of row 4 b + i at
// byte (u * 4 + i) * unit bytes of block b), so a block is read as one sequential stream
// (measured faster than 4 row streams, with or without software prefetch); scales and offsets
// (or zero points) likewise, (rows / 4, groups, 4): group g of row 4 b + i at (b G + g) 4 + i.
struct Rows {
  const uint8_t* codes;
  const float* scale;
  const float* offset;  // or nullptr
  const uint8_t* zero;  // or nullptr
  int64_t row_bytes, groups, group, cols;
  template <int BITS>
  const uint8_t* unit(int64_t r, int64_t u) const {  // unit u (64 columns) of row r
    return codes + (r / 4) * 4 * row_bytes + (u * 4 + r % 4) * unit_bytes(BITS);
  }
  int64_t param(int64_t r, int64_t g) const { return ((r / 4) * groups + g) * 4 + r % 4; }
  float o(int64_t j) const { return zero ? -scale[j] * static_cast<float>(zero[j]) : offset[j]; }
  __m128 o4(int64_t j) const {  // the offsets of the 4 rows of a block at param index j
    if (!zero) return _mm_loadu_ps(offset + j);
    int32_t z4;
    std::memcpy(&z4, zero + j, 4);
    return _mm_mul_ps(_mm_sub_ps(_mm_setzero_ps(), _mm_loadu_ps(scale + j)),
                      _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(z4))));
  }
};

// y[0 .. 4) of the block of row r when the group is a multiple of 64 columns (both chunks of
// a unit share one group): per group, sum_k d_k (q . X)_k in float lanes, times s_rg, and
// o_rg XS_g for the 4 rows in the lanes of one 128-bit vector.
template <int BITS>
void block_units(const Rows& w, const Act& a, int64_t r, float* y) {
  constexpr int64_t ub = unit_bytes(BITS);
  __m256 facc[4];
  for (int i = 0; i < 4; ++i) facc[i] = _mm256_setzero_ps();
  __m128 oacc = _mm_setzero_ps();
  const uint8_t* base = w.unit<BITS>(r, 0);
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 gacc[4];
    for (int i = 0; i < 4; ++i) gacc[i] = _mm256_setzero_ps();
    for (int64_t u = g * w.group / kUnit; u < (g + 1) * w.group / kUnit; ++u) {
      const __m256 d0 = _mm256_set1_ps(a.d[2 * u]), d1 = _mm256_set1_ps(a.d[2 * u + 1]);
      const int8_t* X = a.X.data() + u * kUnit;
      for (int i = 0; i < 4; ++i) {
        const uint8_t* p = base + (u * 4 + i) * ub;
        gacc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(ipath::chunk<BITS, 0>(p), X)), d0, gacc[i]);
        gacc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(ipath::chunk<BITS, 1>(p), X + 32)), d1, gacc[i]);
      }
    }
    const int64_t j = w.param(r, g);
    for (int i = 0; i < 4; ++i) facc[i] = _mm256_fmadd_ps(gacc[i], _mm256_set1_ps(w.scale[j + i]), facc[i]);
    oacc = _mm_fmadd_ps(w.o4(j), _mm_set1_ps(a.XS[g]), oacc);
  }
  float o[4];
  _mm_storeu_ps(o, oacc);
  for (int i = 0; i < 4; ++i) y[i] = ::hsum(facc[i]) + o[i];
}

// One row for any group that is a multiple of 32 (a unit may straddle two groups): s_rg d_k
// per segment, then the offset term.
template <int BITS>
float row_segments(const Rows& w, const Act& a, int64_t r) {
  __m256 facc = _mm256_setzero_ps();
  for (int64_t k = 0; k < w.cols / 32; ++k) {
    const __m256i v = ipath::chunk_at<BITS>(w.unit<BITS>(r, k / 2), static_cast<int>(k & 1));
    const float sd = w.scale[w.param(r, 32 * k / w.group)] * a.d[k];
    facc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(v, a.X.data() + 32 * k)), _mm256_set1_ps(sd), facc);
  }
  float y = ::hsum(facc);
  for (int64_t g = 0; g < w.groups; ++g) y += w.o(w.param(r, g)) * a.XS[g];
  return y;
}

// rows [r0, r1) (multiples of 4) of every activation row: a block's codes stay in L1 across
// the M activation rows
template <int BITS>
void run(const Rows& w, const std::vector<Act>& acts, int64_t rows, int64_t r0, int64_t r1,
         float* out) {
  for (int64_t r = r0; r < r1; r += 4)
    for (size_t m = 0; m < acts.size(); ++m) {
      float* y = out + static_cast<int64_t>(m) * rows + r;
      if (w.group % kUnit == 0) block_units<BITS>(w, acts[m], r, y);
      else
        for (int i = 0; i < 4; ++i) y[i] = row_segments<BITS>(w, acts[m], r + i);
    }
}

}  // namespace a8
#endif

// --- bit-plane table-lookup path (backend `cpp-lut`), 2/3/4-bit ----------------------------
// The cost of the integer path above is per product, whatever the bit width. Here it is per
// weight BIT: a code q = sum_p 2^p b_p is split into bit planes, and for every 4-column group g
// of an activation row the 16 sums T_g[i] = sum_{k: bit k of i} X[4g + k] are tabulated once
// per call. A row's plane p over group g is then one 4-bit index i, and
//   sum_{c in g} q_c X_c = sum_p 2^p T_g(i_p)
// so a b-bit weight costs b lookups per 4 columns (vpshufb, 32 per instruction).
// Activations are rounded per sub-block of L = min(group, 64) columns to X = round(x / d),
// |X| <= 8191 (d = max |x| / 8191), so |T| <= 4 * 8191 fits int16 and the integer sums are
// exact. vpshufb looks bytes up, so each table is stored as two 16-byte halves,
// L' = (T & 255) - 128 and H = T >> 8 (T = 256 H + L' + 128), and vpmaddubsw applies the plane
// weights 2^p to a pair of lookups of one row in one table (adjacent bytes), summing them
// into int16; the int16 sums of a sub-block (at most 16 groups) cannot overflow.
//
// Layout ("lut", cpu.to_lut): rows in blocks of 16; per block, per pair of groups (g, g+1) =
// 8 columns, the 4-bit indices i_p of the block's rows as nibbles, low nibble group g, high
// nibble group g + 1:
//   2-bit: 32 bytes, byte 2 j + p = row j's plane p (p = 0, 1).
//   4-bit: 64 bytes, two halves of rows 0-7 and 8-15; in a half, byte 4 j + p = row j's plane p.
//   3-bit: per two pairs A, B (16 columns), 96 bytes: the 2-bit layout of A's planes 0-1, of
//          B's, then 32 bytes of plane 2, byte 2 j = row j's for A, byte 2 j + 1 for B. A
//          lookup pair must come from one table, so the two plane-2 bytes of a row (groups
//          of A and of B) are looked up in both tables and blended, then weighted as a pair:
//          the blends cost part of the saved lookup (about 12% fewer instructions than int4).
// Scales and offsets (or uint8 zero points) are stored (rows / 16, groups, 16).
#ifdef __AVX2__
namespace lpath {

constexpr int kXMax = 8191;
constexpr int64_t kRows = 16;
constexpr int64_t kAhead = 2;  // row blocks of software prefetch distance

template <int BITS>
constexpr int64_t pair_bytes() { return BITS == 4 ? 64 : BITS == 3 ? 48 : 32; }  // 8 columns

// One activation row: its tables, (cols / 4, 32) bytes [L' (16) | H (16)] per group, and per
// sub-block the step d and d * sum(X) (the offset term's x sum, of the same rounded x).
struct Tables {
  std::vector<int8_t> t;
  std::vector<float> d, xs;
};

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// X for the sub-blocks of one row, and per sub-block the step d and d * sum(X) (cvtps rounds
// half to even, as nearbyint)
inline void round_row(const float* x, int64_t cols, int64_t sub, int32_t* X, float* d, float* xs) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t s0 = 0; s0 < cols; s0 += sub) {
    __m256 am = _mm256_setzero_ps();
    for (int64_t c = s0; c < s0 + sub; c += 8)
      am = _mm256_max_ps(am, _mm256_and_ps(_mm256_loadu_ps(x + c), absmask));
    const float amax = hmax(am);
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? kXMax / amax : 0.f);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t c = s0; c < s0 + sub; c += 8) {
      const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + c), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(X + c), v);
      sum = _mm256_add_epi32(sum, v);
    }
    d[s0 / sub] = amax / kXMax;
    xs[s0 / sub] = d[s0 / sub] * static_cast<float>(ipath::hsum_i32(sum));
  }
}

inline void build_tables(const float* x, int64_t cols, int64_t sub, Tables& T) {
  T.t.resize(cols / 4 * 32), T.d.resize(cols / sub), T.xs.resize(cols / sub);
  std::vector<int32_t> X(cols);
  round_row(x, cols, sub, X.data(), T.d.data(), T.xs.data());
  // lane i of bit[k] is all ones when bit k of i is set: T_g = sum_k bit[k] & X[4g + k]
  const __m256i e = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m256i bit[4];
  for (int k = 0; k < 4; ++k) {
    const __m256i b = _mm256_set1_epi16(static_cast<int16_t>(1 << k));
    bit[k] = _mm256_cmpeq_epi16(_mm256_and_si256(e, b), b);
  }
  const __m256i low = _mm256_set1_epi16(255), bias = _mm256_set1_epi16(128);
  for (int64_t g = 0; g < cols / 4; ++g) {
    __m256i t = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k)
      t = _mm256_add_epi16(t, _mm256_and_si256(bit[k], _mm256_set1_epi16(static_cast<int16_t>(X[4 * g + k]))));
    const __m256i l = _mm256_sub_epi16(_mm256_and_si256(t, low), bias), h = _mm256_srai_epi16(t, 8);
    // packs works per 128-bit lane: [l 0-7, h 0-7 | l 8-15, h 8-15] -> [l 0-15 | h 0-15]
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(T.t.data() + g * 32),
                        _mm256_permute4x64_epi64(_mm256_packs_epi16(l, h), 0xD8));
  }
}

inline __m256i table(const int8_t* t) {  // 16 bytes in both 128-bit lanes
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
}

// The int16 sums of one register of indices v (low nibbles: group g, high: g + 1) into
// (SL, SH), plane weights W (u8), tables tb = [g: L', H | g + 1: L', H].
inline void lookup(__m256i v, const int8_t* tb, __m256i W, __m256i& SL, __m256i& SH) {
  const __m256i m15 = _mm256_set1_epi8(15);
  const __m256i a = _mm256_and_si256(v, m15), b = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
  SL = _mm256_add_epi16(SL, _mm256_maddubs_epi16(W, _mm256_shuffle_epi8(table(tb), a)));
  SH = _mm256_add_epi16(SH, _mm256_maddubs_epi16(W, _mm256_shuffle_epi8(table(tb + 16), a)));
  SL = _mm256_add_epi16(SL, _mm256_maddubs_epi16(W, _mm256_shuffle_epi8(table(tb + 32), b)));
  SH = _mm256_add_epi16(SH, _mm256_maddubs_epi16(W, _mm256_shuffle_epi8(table(tb + 48), b)));
}

// 3-bit plane 2 of two pairs A, B (tables ta, tb as in lookup) into (SL, SH): even bytes of
// v index A's tables, odd bytes B's; each lookup is done in both and blended by byte parity.
inline void lookup_plane2(__m256i v, const int8_t* ta, const int8_t* tb, __m256i& SL, __m256i& SH) {
  const __m256i m15 = _mm256_set1_epi8(15), odd = _mm256_set1_epi16(static_cast<int16_t>(0xFF00));
  const __m256i W = _mm256_set1_epi16(0x0404);
  const __m256i a = _mm256_and_si256(v, m15), b = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
  const auto both = [&](int t, __m256i i) {  // table half t (L' or H, group g or g + 1)
    return _mm256_maddubs_epi16(W, _mm256_blendv_epi8(_mm256_shuffle_epi8(table(ta + t), i),
                                                      _mm256_shuffle_epi8(table(tb + t), i), odd));
  };
  SL = _mm256_add_epi16(SL, both(0, a)), SH = _mm256_add_epi16(SH, both(16, a));
  SL = _mm256_add_epi16(SL, both(32, b)), SH = _mm256_add_epi16(SH, both(48, b));
}

// Rows 0-7 and 8-15 of a block as int32 (s0, s1) from the int16 sums of one sub-block:
// 4-bit sums hold two lanes (plane pairs) per row, 2/3-bit sums one lane per row.
template <int BITS>
inline void widen(__m256i SL0, __m256i SH0, __m256i SL1, __m256i SH1, __m256i& s0, __m256i& s1) {
  if constexpr (BITS == 4) {
    const __m256i k256 = _mm256_set1_epi16(256), one = _mm256_set1_epi16(1);
    s0 = _mm256_add_epi32(_mm256_madd_epi16(SH0, k256), _mm256_madd_epi16(SL0, one));
    s1 = _mm256_add_epi32(_mm256_madd_epi16(SH1, k256), _mm256_madd_epi16(SL1, one));
  } else {
    const auto lo = [](__m256i v) { return _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)); };
    const auto hi = [](__m256i v) { return _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)); };
    s0 = _mm256_add_epi32(_mm256_slli_epi32(lo(SH0), 8), lo(SL0));
    s1 = _mm256_add_epi32(_mm256_slli_epi32(hi(SH0), 8), hi(SL0));
  }
}

// The integer sums (16 rows, int32 in s0 / s1) of sub-block [c0, c0 + sub) of one row block.
template <int BITS, int SUB>
inline void sub_block(const uint8_t* blk, const int8_t* tabs, int64_t c0, __m256i& s0, __m256i& s1) {
  const __m256i W = BITS == 4 ? _mm256_set1_epi32(0x08040201) : _mm256_set1_epi16(0x0201);
  __m256i SL0 = _mm256_setzero_si256(), SH0 = SL0, SL1 = SL0, SH1 = SL0;
  const auto at = [](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  const uint8_t* p = blk + c0 / 8 * pair_bytes<BITS>();
  const int8_t* tb = tabs + c0 / 4 * 32;
  constexpr int step = BITS == 3 ? 2 : 1;  // pairs per iteration
  for (int q = 0; q < SUB / 8; q += step, p += step * pair_bytes<BITS>(), tb += step * 64) {
    lookup(at(p), tb, W, SL0, SH0);
    if constexpr (BITS == 4) {
      lookup(at(p + 32), tb, W, SL1, SH1);
    } else if constexpr (BITS == 3) {
      lookup(at(p + 32), tb + 64, W, SL0, SH0);
      lookup_plane2(at(p + 64), tb, tb + 64, SL0, SH0);
    }
  }
  widen<BITS>(SL0, SH0, SL1, SH1, s0, s1);
  constexpr int32_t wsum = BITS == 4 ? 15 : BITS == 3 ? 7 : 3;  // the L' bias: 128 per weight
  const __m256i bias = _mm256_set1_epi32(128 * wsum * (SUB / 4));
  s0 = _mm256_add_epi32(s0, bias), s1 = _mm256_add_epi32(s1, bias);
}

// Per-group parameters of a row block, (groups, 16): scale and float offset or uint8 zero.
struct BlockParams {
  const float* scale;
  const float* offset;  // or nullptr
  const uint8_t* zero;  // or nullptr
  __m256 s(int64_t j, int h) const { return _mm256_loadu_ps(scale + j * kRows + 8 * h); }
  __m256 o(int64_t j, int h) const {
    if (offset) return _mm256_loadu_ps(offset + j * kRows + 8 * h);
    const __m128i z = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zero + j * kRows + 8 * h));
    return _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), s(j, h)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z)));
  }
};

// The argument check shared by the row-block kernels: float32 x and scale, uint8 codes of
// `block_bytes` per block (layout `layout`), bits 2/3/4, the shape rules, and scale / offset
// (rows / 16, groups, 16) with float32 offsets or uint8 zero points.
inline void check_blocked(const char* name, const char* layout, const torch::Tensor& x,
                          const torch::Tensor& codes, const torch::Tensor& scale,
                          const torch::Tensor& offset, int64_t bits, int64_t group, int64_t block_bytes) {
  const int64_t cols = x.size(1), blocks = codes.size(0);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && codes.dtype() == torch::kUInt8 &&
              scale.dtype() == torch::kFloat32 && (bits == 2 || bits == 3 || bits == 4),
              name, ": float32 x, uint8 codes, float32 scale, bits 2/3/4");
  TORCH_CHECK(cols % 64 == 0 && group % 32 == 0 && cols % group == 0 &&
              codes.size(1) == block_bytes && scale.dim() == 3 && scale.size(0) == blocks &&
              scale.size(1) == cols / group && scale.size(2) == 16 && offset.sizes() == scale.sizes() &&
              (offset.scalar_type() == torch::kUInt8 || offset.scalar_type() == torch::kFloat32),
              name, ": cols % 64 == 0, group % 32 == 0, codes (rows/16, ", layout,
              "), scale/offset (rows/16, groups, 16)");
}

// The parameters of row block b (scale / offset as check_blocked accepts them)
inline BlockParams block_params(const torch::Tensor& scale, const torch::Tensor& offset, int64_t b) {
  const int64_t po = b * scale.size(1) * kRows;
  const bool z = offset.scalar_type() == torch::kUInt8;
  return {scale.data_ptr<float>() + po, z ? nullptr : offset.data_ptr<float>() + po,
          z ? offset.data_ptr<uint8_t>() + po : nullptr};
}

inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64)
    _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T1);
}

// y[0..16) of one row block and one activation row: sum over sub-blocks k (in group j) of
// scale * d[k] * S + offset * xs[k]. ahead (bytes of lut per block, or 0): prefetch the same
// sub-block of the block kAhead further on, codes and parameters.
template <int BITS, int SUB>
void block_dot(const uint8_t* blk, const BlockParams& bp, const Tables& T, int64_t cols,
               int64_t group, int64_t ahead, float* y) {
  constexpr int64_t sub = SUB;
  __m256 y0 = _mm256_setzero_ps(), y1 = y0;
  const int64_t groups = cols / group, pbytes = ahead ? (bp.zero ? 1 : 4) : 0;
  for (int64_t c0 = 0; c0 < cols; c0 += sub) {
    if (ahead) {
      prefetch(blk + kAhead * ahead + c0 / 8 * pair_bytes<BITS>(), sub / 8 * pair_bytes<BITS>());
      if (c0 % group == 0) {
        const int64_t at = (kAhead * groups + c0 / group) * kRows;
        prefetch(bp.scale + at, 64);
        prefetch(bp.zero ? static_cast<const void*>(bp.zero + at) : bp.offset + at, kRows * pbytes);
      }
    }
    __m256i s0, s1;
    sub_block<BITS, SUB>(blk, T.t.data(), c0, s0, s1);
    const int64_t j = c0 / group, k = c0 / sub;
    const __m256 d = _mm256_set1_ps(T.d[k]), xs = _mm256_set1_ps(T.xs[k]);
    y0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(bp.s(j, 0), d), y0);
    y1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(bp.s(j, 1), d), y1);
    y0 = _mm256_fmadd_ps(bp.o(j, 0), xs, y0);
    y1 = _mm256_fmadd_ps(bp.o(j, 1), xs, y1);
  }
  _mm256_storeu_ps(y, y0), _mm256_storeu_ps(y + 8, y1);
}

// The frame both row-block kernels run in (qgemm_lut, qgemm_vnni): the tensors made contiguous
// and checked (check_blocked, codes of block_bytes per block), every activation row prepared
// once (prep(x row, cols, sub, rows[m]), rows in parallel), then the output (M, blocks * kRows)
// filled by block(rows, b, b1, frame) for every row block b of a thread's range [.., b1).
struct Frame {
  torch::Tensor codes, scale, offset, out;
  int64_t M, cols, group, bits, sub;
};

template <class Row, class Prep, class Block>
torch::Tensor blocked_frame(const char* name, const char* layout, int64_t block_bytes,
                            const torch::Tensor& x_in, const torch::Tensor& codes,
                            const torch::Tensor& scale, const torch::Tensor& offset,
                            int64_t bits, int64_t group, Prep prep, Block block) {
  const torch::Tensor x = x_in.contiguous();
  Frame f{codes.contiguous(), scale.contiguous(), offset.contiguous(), torch::Tensor(),
          x.size(0), x.size(1), group, bits, std::min<int64_t>(group, 64)};
  check_blocked(name, layout, x, f.codes, f.scale, f.offset, bits, group, block_bytes);
  std::vector<Row> rows(f.M);
  at::parallel_for(0, f.M, 1, [&](int64_t a, int64_t b) {
    for (int64_t m = a; m < b; ++m) prep(x.data_ptr<float>() + m * f.cols, f.cols, f.sub, rows[m]);
  });
  f.out = torch::empty({f.M, f.codes.size(0) * kRows}, x.options());
  at::parallel_for(0, f.codes.size(0), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block(rows, b, b1, f);
  });
  return f.out;
}

}  // namespace lpath
#endif

// The prefetch stride of block b of a thread's range [.., b1): the lut bytes per block while
// block b + kAhead is still in the range, else 0 (no prefetch).
inline int64_t lut_prefetch_stride(int64_t b, int64_t b1, int64_t block_bytes) {
#ifdef __AVX2__
  return b + lpath::kAhead < b1 ? block_bytes : 0;
#else
  return 0;
#endif
}

// x (M, cols) float32; lut (rows / 16, cols / 8 * pair bytes) uint8 (layout above); scale
// (rows / 16, groups, 16) float32; offset the same shape, float32 offsets or uint8 zero points.
torch::Tensor qgemm_lut(torch::Tensor x, torch::Tensor lut, torch::Tensor scale,
                        torch::Tensor offset, int64_t bits, int64_t group) {
#ifdef __AVX2__
  const int64_t pb = bits == 4 ? 64 : bits == 3 ? 48 : 32;
  const auto block = [](const std::vector<lpath::Tables>& T, int64_t b, int64_t b1, const lpath::Frame& f) {
    const int64_t bb = f.codes.size(1), blocks = f.codes.size(0);
    const uint8_t* blk = f.codes.data_ptr<uint8_t>() + b * bb;
    const lpath::BlockParams bp = lpath::block_params(f.scale, f.offset, b);
    const int64_t ahead = lut_prefetch_stride(b, b1, bb);
    for (int64_t m = 0; m < f.M; ++m) {
      float* y = f.out.data_ptr<float>() + m * blocks * lpath::kRows + b * lpath::kRows;
      const int64_t a = m == 0 ? ahead : 0;
      const auto run = [&](auto bits_c, auto sub_c) {
        lpath::block_dot<decltype(bits_c)::value, decltype(sub_c)::value>(blk, bp, T[m], f.cols, f.group, a, y);
      };
      using S32 = std::integral_constant<int, 32>;
      using S64 = std::integral_constant<int, 64>;
      const auto with_sub = [&](auto bits_c) { f.sub == 32 ? run(bits_c, S32{}) : run(bits_c, S64{}); };
      switch (f.bits) {
        case 2: with_sub(std::integral_constant<int, 2>{}); break;
        case 3: with_sub(std::integral_constant<int, 3>{}); break;
        default: with_sub(std::integral_constant<int, 4>{});
      }
    }
  };
  return lpath::blocked_frame<lpath::Tables>("qgemm_lut", "cols/8*pair bytes", x.size(1) / 8 * pb, x, lut,
                                             scale, offset, bits, group, lpath::build_tables, block);
#else
  TORCH_CHECK(false, "qgemm_lut needs AVX2");
#endif
}

// --- AVX-512 VNNI path (backend `cpp-vnni`), 2/3/4-bit ---------------------------------------
// The same integer sums as the table-lookup path (activations rounded per sub-block of
// L = min(group, 64) columns to |X| <= 8191, codes exact), computed as products with vpdpbusd:
// one instruction multiplies 64 unsigned bytes (codes) by 64 signed bytes (activations) and
// adds each 4 adjacent products into one of 16 int32 lanes. A lane is a row of a 16-row block
// and its 4 bytes are codes of 4 consecutive columns, so the activation operand is the same
// 4 bytes broadcast to every lane. X does not fit a signed byte, so it is split once per call,
// X = 128 h + l with h in [-64, 64] and l in [-64, 63], and every code register is multiplied
// twice: S = 128 sum(q h) + sum(q l) = sum(q X), exact (|S| per sub-block < 2^31).
// Cost: 2 vpdpbusd per 4 columns x 16 rows, whatever the bit width; codes take a shift and a
// mask to become bytes (about 2 operations per register for 3-bit codes, below).
//
// Layout ("vnni", cpu.to_vnni): rows in blocks of 16; per block, chunks of columns, 64 bytes
// per code plane, lane r (bytes 4 r .. 4 r + 3) = row r, byte i of a lane:
//   4-bit: chunks of 8 columns: q[c + i] | q[c + 4 + i] << 4.
//   2-bit: chunks of 16 columns: sum_k q[c + 4 k + i] << 2 k.
//   3-bit: chunks of 32 columns, three registers R0, R1, R2 of 64 bytes; with q_k = q[c + 4 k + i]:
//          R0 byte i = q_0 | q_1 << 3 | (q_6 & 3) << 6, R1 = q_2 | q_3 << 3 | (q_7 & 3) << 6,
//          R2 = q_4 | q_5 << 3 | (q_6 >> 2) << 6 | (q_7 >> 2) << 7: six codes take a shift and a
//          mask, two a shift each from two registers and a merge (vpternlog) and a mask.
// Scales and offsets (or uint8 zero points) as the lut path: (rows / 16, groups, 16).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
namespace vpath {

using lpath::kRows;
constexpr int kMT = 4;  // activation rows sharing one decode of the codes
// software prefetch distance: about 32 KiB of codes (in whole row blocks), into L2 (measured on
// Zen 4: 8-64 KiB alike, 2 KiB or none far slower, T0 and NTA hints slower than T1)
constexpr int64_t kPrefetchBytes = 32 << 10;

template <int BITS>
constexpr int64_t chunk_cols() { return BITS == 4 ? 8 : BITS == 2 ? 16 : 32; }
template <int BITS>
constexpr int64_t chunk_bytes() { return BITS == 3 ? 192 : 64; }

// One activation row: X = 128 h + l, h and l as int8, 4 columns per int32 word; per sub-block
// the step d and d * sum(X) (the offset term's x sum)
struct SplitX {
  std::vector<int32_t> h, l;
  std::vector<float> d, xs;
};

inline void split_row(const float* x, int64_t cols, int64_t sub, SplitX& S) {
  std::vector<int32_t> X(cols);
  std::vector<int8_t> h(cols), l(cols);
  S.h.resize(cols / 4), S.l.resize(cols / 4), S.d.resize(cols / sub), S.xs.resize(cols / sub);
  lpath::round_row(x, cols, sub, X.data(), S.d.data(), S.xs.data());
  for (int64_t c = 0; c < cols; ++c) {
    const int32_t hc = (X[c] + 64) >> 7;  // floor: l = X - 128 h in [-64, 63]
    h[c] = static_cast<int8_t>(hc), l[c] = static_cast<int8_t>(X[c] - 128 * hc);
  }
  std::memcpy(S.h.data(), h.data(), cols), std::memcpy(S.l.data(), l.data(), cols);
}

// Codes of columns 4 k .. 4 k + 3 of the chunk at p as bytes, lane r = row r (k constant
// once unrolled)
template <int BITS>
inline __m512i codes(const uint8_t* p, int k) {
  const auto at = [](const uint8_t* a) { return _mm512_loadu_si512(a); };
  if constexpr (BITS == 4) {
    return _mm512_and_si512(_mm512_srli_epi16(at(p), 4 * k), _mm512_set1_epi8(15));
  } else if constexpr (BITS == 2) {
    return _mm512_and_si512(_mm512_srli_epi16(at(p), 2 * k), _mm512_set1_epi8(3));
  } else {  // k < 6: field k % 2 of register k / 2; k = 6, 7: bits 6-7 of register k - 6 and
            // bit k of register 2 (vpternlog 0xE4: c ? a : b, c = 3 per byte)
    const __m512i m7 = _mm512_set1_epi8(7);
    if (k < 6) return _mm512_and_si512(_mm512_srli_epi16(at(p + 64 * (k / 2)), 3 * (k % 2)), m7);
    const __m512i lo = _mm512_srli_epi16(at(p + 64 * (k - 6)), 6), hi = _mm512_srli_epi16(at(p + 128), k - 2);
    return _mm512_and_si512(_mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi8(3), 0xE4), m7);
  }
}

// S[m] (lanes = 16 rows) = sum over the SUB columns at p (word w0 of x) of q X_m, m < MT.
// vpdpbusd takes a few cycles and issues about one per cycle: one activation row alternates
// two accumulator pairs so that four sums are in flight.
template <int BITS, int SUB, int MT>
inline void sub_sums(const uint8_t* p, const SplitX* const* x, int64_t w0, __m512i* S) {
  constexpr int KC = static_cast<int>(chunk_cols<BITS>() / 4), NA = MT == 1 ? 2 : 1;
  constexpr int W = SUB / 4;  // activation words (4 columns each) of the sub-block
  const int32_t* xh[MT];
  const int32_t* xl[MT];
  __m512i H[MT * NA], L[MT * NA];
  for (int m = 0; m < MT; ++m) xh[m] = x[m]->h.data() + w0, xl[m] = x[m]->l.data() + w0;
  for (int i = 0; i < MT * NA; ++i) H[i] = _mm512_setzero_si512(), L[i] = H[i];
#pragma GCC unroll 16
  for (int w = 0; w < W; ++w) {  // chunk w / KC, its code register k = w % KC
    const __m512i q = codes<BITS>(p + w / KC * chunk_bytes<BITS>(), w % KC);
    const int a = w % NA;
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      H[m * NA + a] = _mm512_dpbusd_epi32(H[m * NA + a], q, _mm512_set1_epi32(xh[m][w]));
      L[m * NA + a] = _mm512_dpbusd_epi32(L[m * NA + a], q, _mm512_set1_epi32(xl[m][w]));
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m512i h = H[m * NA], l = L[m * NA];
    for (int a = 1; a < NA; ++a) h = _mm512_add_epi32(h, H[m * NA + a]), l = _mm512_add_epi32(l, L[m * NA + a]);
    S[m] = _mm512_add_epi32(_mm512_slli_epi32(h, 7), l);
  }
}

// y_m[0..16) = sum over groups j and their sub-blocks k of scale_j * d[k] * S + offset_j * xs[k].
// ahead (row blocks, or 0): prefetch the same columns of the block that far on, codes and
// parameters (block_bytes of codes per block).
template <int BITS, int SUB, int MT>
void block_dot(const uint8_t* blk, const lpath::BlockParams& bp, const SplitX* const* x,
               int64_t cols, int64_t group, int64_t ahead, int64_t block_bytes, float* const* y) {
  constexpr int64_t bytes = SUB * BITS * 2;  // code bytes of one sub-block of 16 rows
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t groups = cols / group, per = group / SUB, pbytes = bp.zero ? 1 : 4;
  const uint8_t* p = blk;
  for (int64_t j = 0, k = 0; j < groups; ++j) {
    if (ahead) {
      const int64_t at = (ahead * groups + j) * kRows;
      lpath::prefetch(bp.scale + at, 64);
      lpath::prefetch(bp.zero ? static_cast<const void*>(bp.zero + at) : bp.offset + at, kRows * pbytes);
    }
    const __m512 s = _mm512_loadu_ps(bp.scale + j * kRows);
    const __m512 o = bp.offset ? _mm512_loadu_ps(bp.offset + j * kRows) : _mm512_mul_ps(
        _mm512_sub_ps(_mm512_setzero_ps(), s),
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bp.zero + j * kRows)))));
    for (int64_t t = 0; t < per; ++t, ++k, p += bytes) {
      if (ahead) lpath::prefetch(p + ahead * block_bytes, bytes);
      __m512i S[MT];
      sub_sums<BITS, SUB, MT>(p, x, k * SUB / 4, S);
      for (int m = 0; m < MT; ++m) {
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S[m]), _mm512_mul_ps(s, _mm512_set1_ps(x[m]->d[k])), acc[m]);
        acc[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(x[m]->xs[k]), acc[m]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(y[m], acc[m]);
}

// One row block of one call: its codes, parameters, the shape and the prefetch distance.
struct Call {
  const uint8_t* blk;
  const lpath::BlockParams* bp;
  int64_t cols, group, block_bytes, ahead;
};

// block_dot for the runtime bits, sub-block and tile height (prefetching on the first tile)
inline void dispatch(const Call& c, int64_t bits, int64_t sub, int mt, bool first,
                     const SplitX* const* x, float* const* y) {
  const int64_t a = first ? c.ahead : 0;
  const auto with = [&](auto bits_c, auto sub_c) {
    constexpr int B = decltype(bits_c)::value, S = decltype(sub_c)::value;
    if (mt == kMT) block_dot<B, S, kMT>(c.blk, *c.bp, x, c.cols, c.group, a, c.block_bytes, y);
    else block_dot<B, S, 1>(c.blk, *c.bp, x, c.cols, c.group, a, c.block_bytes, y);
  };
  const auto by_sub = [&](auto bits_c) {
    if (sub == 32) with(bits_c, std::integral_constant<int, 32>{});
    else with(bits_c, std::integral_constant<int, 64>{});
  };
  if (bits == 2) by_sub(std::integral_constant<int, 2>{});
  else if (bits == 3) by_sub(std::integral_constant<int, 3>{});
  else by_sub(std::integral_constant<int, 4>{});
}

}  // namespace vpath
#endif

// x (M, cols) float32; codes (rows / 16, cols * bits / 8 * 16) uint8 (the vnni layout above);
// scale / offset as qgemm_lut.
torch::Tensor qgemm_vnni(torch::Tensor x, torch::Tensor codes, torch::Tensor scale,
                         torch::Tensor offset, int64_t bits, int64_t group) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  const auto block = [](const std::vector<vpath::SplitX>& X, int64_t b, int64_t b1, const lpath::Frame& f) {
    const int64_t bb = f.codes.size(1), blocks = f.codes.size(0);
    const int64_t far = (vpath::kPrefetchBytes + bb - 1) / bb;  // prefetch distance in blocks
    const lpath::BlockParams bp = lpath::block_params(f.scale, f.offset, b);
    const vpath::Call c{f.codes.data_ptr<uint8_t>() + b * bb, &bp, f.cols, f.group, bb, b + far < b1 ? far : 0};
    for (int64_t m0 = 0; m0 < f.M;) {  // activation rows in tiles of kMT, then one by one
      const int mt = f.M - m0 >= vpath::kMT ? vpath::kMT : 1;
      const vpath::SplitX* xs[vpath::kMT];
      float* ys[vpath::kMT];
      for (int i = 0; i < mt; ++i)
        xs[i] = &X[m0 + i], ys[i] = f.out.data_ptr<float>() + (m0 + i) * blocks * vpath::kRows + b * vpath::kRows;
      vpath::dispatch(c, f.bits, f.sub, mt, m0 == 0, xs, ys);
      m0 += mt;
    }
  };
  return lpath::blocked_frame<vpath::SplitX>("qgemm_vnni", "cols*bits*2", x.size(1) * bits * 2, x, codes,
                                             scale, offset, bits, group, vpath::split_row, block);
#else
  TORCH_CHECK(false, "qgemm_vnni needs AVX-512 VNNI");
#endif
}

// The segment length for activation rounding: the group if <= 256 columns, else the largest
// multiple of 32 that divides the group and 256.
int64_t int_segment(int64_t group) {
  if (group <= 256) return group;
  int64_t s = 256;
  while (group % s) s /= 2;
  return s;
}

#ifdef __AVX2__
// The checked problem of a unit-layout kernel (cpp-i16, cpp-a8); offset: float32 offsets, or
// uint8 integer zero points (offset = -scale * zero), (rows, groups)
Problem unit_problem(torch::Tensor x, torch::Tensor units, torch::Tensor scale,
                     torch::Tensor offset, int64_t bits, int64_t group) {
  Problem p(x, units, scale, offset, bits, group, /*with_xsum=*/false);
  TORCH_CHECK((offset.scalar_type() == torch::kUInt8 || offset.scalar_type() == torch::kFloat32) &&
              offset.sizes() == scale.sizes(), "offset: float32 or uint8, shaped like scale");
  TORCH_CHECK(p.cols % ipath::kUnit == 0 && group % 32 == 0 &&
              p.row_bytes == p.cols / ipath::kUnit * ipath::unit_bytes(static_cast<int>(bits)),
              "units: cols % 64 == 0, group % 32 == 0, (rows, cols / 64 * unit bytes)");
  return p;
}
#endif

// Backend `cpp-a8` (namespace a8 above): the activations rounded to int8 per 32 columns
// (dynamic, per call) times the codes in blocks of 4 rows: W2/3/4 x A8. Not exact: each x is
// off by up to d / 2 with d = max |x| / 127 over its 32 columns (cpu.py states the bound).
torch::Tensor qgemm_a8(torch::Tensor x, torch::Tensor units, torch::Tensor scale,
                       torch::Tensor offset, int64_t bits, int64_t group) {
#ifdef __AVX2__
  TORCH_CHECK(bits >= 2 && bits <= 4, "qgemm_a8: 2, 3 or 4-bit codes");
  const Problem p = unit_problem(x, units, scale, offset, bits, group);
  TORCH_CHECK(p.rows % 4 == 0, "qgemm_a8: rows % 4 == 0 (blocks of 4 rows, cpu.to_a8)");
  const bool z = p.offset.scalar_type() == torch::kUInt8;
  const a8::Rows w{p.codes.data_ptr<uint8_t>(), p.scale.data_ptr<float>(),
                   z ? nullptr : p.offset.data_ptr<float>(), z ? p.offset.data_ptr<uint8_t>() : nullptr,
                   p.row_bytes, p.groups, p.group, p.cols};
  std::vector<a8::Act> acts;
  for (int64_t m = 0; m < p.M; ++m)
    acts.push_back(a8::quantize(p.x.data_ptr<float>() + m * p.cols, p.cols, p.group));
  float* out = p.out.data_ptr<float>();
  at::parallel_for(0, p.rows / 4, 4, [&](int64_t b0, int64_t b1) {
    switch (bits) {
      case 2: a8::run<2>(w, acts, p.rows, 4 * b0, 4 * b1, out); break;
      case 3: a8::run<3>(w, acts, p.rows, 4 * b0, 4 * b1, out); break;
      default: a8::run<4>(w, acts, p.rows, 4 * b0, 4 * b1, out);
    }
  });
  return p.out;
#else
  TORCH_CHECK(false, "qgemm_a8 needs AVX2");
#endif
}

// offset: float32 offsets, or uint8 integer zero points (offset = -scale * zero), (rows, groups)
torch::Tensor qgemm_int(torch::Tensor x, torch::Tensor units, torch::Tensor scale,
                        torch::Tensor offset, int64_t bits, int64_t group) {
#ifdef __AVX2__
  const Problem p = unit_problem(x, units, scale, offset, bits, group);
  const int64_t seg = int_segment(group);
  std::vector<ipath::QuantX> qx(p.M);
  for (int64_t m = 0; m < p.M; ++m)
    ipath::quantize_row(p.x.data_ptr<float>() + m * p.cols, p.cols, seg, qx[m]);
  at::parallel_for(0, p.rows, 16, [&](int64_t r0, int64_t r1) {
    switch (bits) {
      case 2: ipath::run_rows_any<2>(p, qx, seg, r0, r1); break;
      case 3: ipath::run_rows_any<3>(p, qx, seg, r0, r1); break;
      case 4: ipath::run_rows_any<4>(p, qx, seg, r0, r1); break;
      default: ipath::run_rows_any<8>(p, qx, seg, r0, r1);
    }
  });
  return p.out;
#else
  TORCH_CHECK(false, "qgemm_int needs AVX2");
#endif
}

// Rows [r0, r1) of a unit-layout weight as float32 (r1 - r0, cols) (see dequant_rows).
torch::Tensor dequant_int(torch::Tensor units, torch::Tensor scale, torch::Tensor offset,
                          int64_t bits, int64_t group, int64_t r0, int64_t r1) {
#ifdef __AVX2__
  units = units.contiguous(), scale = scale.contiguous(), offset = offset.contiguous();
  TORCH_CHECK(units.dtype() == torch::kUInt8 && scale.dtype() == torch::kFloat32 &&
              (offset.scalar_type() == torch::kUInt8 || offset.scalar_type() == torch::kFloat32) &&
              offset.sizes() == scale.sizes(), "units uint8, scale float32, offset float32 or uint8");
  const int64_t row_bytes = units.size(1), ub = ipath::unit_bytes(static_cast<int>(bits));
  const int64_t cols = row_bytes / ub * ipath::kUnit, groups = scale.size(1);
  TORCH_CHECK(row_bytes % ub == 0 && group % 32 == 0 && groups * group == cols &&
              0 <= r0 && r0 <= r1 && r1 <= units.size(0), "dequant_int: shapes or row range");
  auto out = torch::empty({r1 - r0, cols}, scale.options());
  const bool z = offset.scalar_type() == torch::kUInt8;
  const uint8_t* codes = units.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* op = z ? nullptr : offset.data_ptr<float>();
  const uint8_t* zp = z ? offset.data_ptr<uint8_t>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t b) {
    float* dst = o + (a - r0) * cols;
    switch (bits) {
      case 2: ipath::dequant_rows<2>(codes, row_bytes, sp, op, zp, groups, group, cols, a, b, dst); break;
      case 3: ipath::dequant_rows<3>(codes, row_bytes, sp, op, zp, groups, group, cols, a, b, dst); break;
      case 4: ipath::dequant_rows<4>(codes, row_bytes, sp, op, zp, groups, group, cols, a, b, dst); break;
      default: ipath::dequant_rows<8>(codes, row_bytes, sp, op, zp, groups, group, cols, a, b, dst);
    }
  });
  return out;
#else
  TORCH_CHECK(false, "dequant_int needs AVX2");
#endif
}

// Reads every byte of `buf` once (all threads, 32-byte loads): the machine's read bandwidth
// for the benchmark's peak. Returns a checksum so the loads cannot be optimised away.
int64_t stream_read(torch::Tensor buf) {
  TORCH_CHECK(buf.dtype() == torch::kUInt8 && buf.is_contiguous() && buf.numel() % 128 == 0,
              "buf: contiguous uint8, a multiple of 128 bytes");
  const uint8_t* p = buf.data_ptr<uint8_t>();
  std::vector<int64_t> part(at::get_num_threads() + 1, 0);
  at::parallel_for(0, buf.numel() / 128, 512, [&](int64_t b0, int64_t b1) {
    int64_t acc = 0;
#ifdef __AVX2__
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t b = b0; b < b1; ++b) {
      const __m256i* q = reinterpret_cast<const __m256i*>(p + 128 * b);
      a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(q)), a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(q + 1));
      a2 = _mm256_xor_si256(a2, _mm256_loadu_si256(q + 2)), a3 = _mm256_xor_si256(a3, _mm256_loadu_si256(q + 3));
    }
    const __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    acc = _mm256_extract_epi64(a, 0) ^ _mm256_extract_epi64(a, 3);
#else
    for (int64_t i = 128 * b0; i < 128 * b1; i += 64) acc ^= p[i];
#endif
    part[at::get_thread_num()] ^= acc;
  });
  int64_t total = 0;
  for (int64_t v : part) total ^= v;
  return total;
}

bool has_vnni() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

bool has_avx2() {
#ifdef __AVX2__
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemm", &qgemm, "weight-only low-bit GEMM (packed codes, group scale/offset)");
  m.def("qgemm_planar", &qgemm_planar, "the same on the row-planar layout (fast path)");
  m.def("qgemm_int", &qgemm_int, "16-bit fixed-point activations x codes on the unit layout");
  m.def("qgemm_a8", &qgemm_a8, "int8 dynamic activations x 2/3/4-bit codes on the unit layout");
  m.def("qgemm_lut", &qgemm_lut, "bit-plane table lookups (vpshufb) on the lut layout, 2/3/4-bit");
  m.def("qgemm_vnni", &qgemm_vnni, "vpdpbusd products on the vnni layout, 2/3/4-bit");
  m.def("dequant_int", &dequant_int, "rows of a unit-layout weight as float32 (large-M path)");
  m.def("stream_read", &stream_read, "read a buffer once with all threads (bandwidth probe)");
  m.def("has_avx2", &has_avx2, "whether the integer path was compiled (AVX2)");
  m.def("has_vnni", &has_vnni, "whether the vnni path was compiled (AVX-512 VNNI)");
}

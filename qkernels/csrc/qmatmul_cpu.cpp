// CPU kernels for the packed quantized formats (see kernels/packing.py and kernels/reference.py).
//
// Both kernels are grouped (the MoE form): x_sorted [R, K] fp32 holds the rows of every expert, expert e owning
// rows offsets[e]..offsets[e+1]; a dense layer is the case E = 1. Weights are [E, N, ...]; y [R, N] fp32.
//
// affine3: 3-bit codes, 32 per three int32 words (a code may straddle two words), fp16 scale/zero per group:
//   y[r, n] = sum_g s[n,g] * sum_{k in g} q[n,k] x[r,k]  -  sum_g s[n,g] z[n,g] * xsum[r,g]
//   so the inner loop is an FMA of unpacked-and-scaled codes with x, shared by all rows of the expert; the zero
//   point costs one scalar per group. An optional low-rank compensator adds U_e (V_e x).
// codebook4: 4-bit indices, 8 per int32 word, into a 16-entry fp16 codebook per (row, group):
//   y[r, n] = sum_k c[n, g(k), idx[n,k]] x[r,k]; the lookup is two in-register permutes and a blend.
//
// Decode is memory-bound: each weight word is read once and used for every row of its expert (up to R rows;
// callers send prefill-sized batches to dequantize + matmul instead). Work is split over (expert, block of N).
// With AVX2+FMA+F16C the inner loops are vectorised; elsewhere a scalar path computes the same sums.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SPECMOE_AVX2 1
#else
#define SPECMOE_AVX2 0
#endif
#if SPECMOE_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define SPECMOE_AVX512 1
#else
#define SPECMOE_AVX512 0
#endif

namespace {

constexpr int64_t kBlockN = 16;
constexpr int64_t kCodesPerTask = 1 << 16;  // below this much work per task a second thread costs more than it saves

int64_t grain(int64_t N, int64_t K, int64_t rows_per_expert) {
  const int64_t per_block = kBlockN * K * std::max<int64_t>(1, rows_per_expert);
  return std::max<int64_t>(1, kCodesPerTask / std::max<int64_t>(1, per_block));
}

inline float half_to_float(at::Half h) { return static_cast<float>(h); }

// The four 24-bit chunks (8 codes each) of a 32-code block of 3-bit codes.
inline void chunks3(const uint32_t* w, uint32_t c[4]) {
  c[0] = w[0] & 0xFFFFFFu;
  c[1] = (w[0] >> 24) | ((w[1] & 0xFFFFu) << 8);
  c[2] = (w[1] >> 16) | ((w[2] & 0xFFu) << 16);
  c[3] = w[2] >> 8;
}

// Unpacks the codes of one row segment [0, len) (len a multiple of 32) into floats.
inline void unpack3(const uint32_t* words, int64_t len, float* out) {
  for (int64_t b = 0; b < len / 32; ++b) {
    uint32_t c[4];
    chunks3(words + 3 * b, c);
#if SPECMOE_AVX2
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    const __m256i seven = _mm256_set1_epi32(7);
    for (int j = 0; j < 4; ++j) {
      __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)c[j]), shifts), seven);
      _mm256_storeu_ps(out + 32 * b + 8 * j, _mm256_cvtepi32_ps(v));
    }
#else
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 8; ++i) out[32 * b + 8 * j + i] = (float)((c[j] >> (3 * i)) & 7u);
#endif
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
#if SPECMOE_AVX2
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  float s = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

// Asks for `bytes` from p into the cache ahead of use (the weights stream from memory once per call).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

#if SPECMOE_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

#if SPECMOE_AVX512
// 64 3-bit codes (24 bytes at p, or 12 bytes for 32 codes) as bytes 0..63 of a zmm: vpermb gives qword lane L the
// stream bytes 3L..3L+7 (its 8 codes start at bit 24L), vpmultishiftqb pulls the 8 codes at bit offsets 3b.
alignas(64) const uint8_t kSpread[64] = {
    0,  1,  2,  3,  4,  5,  6,  7,  3,  4,  5,  6,  7,  8,  9,  10, 6,  7,  8,  9,  10, 11,
    12, 13, 9,  10, 11, 12, 13, 14, 15, 16, 12, 13, 14, 15, 16, 17, 18, 19, 15, 16, 17, 18,
    19, 20, 21, 22, 18, 19, 20, 21, 22, 23, 24, 25, 21, 22, 23, 24, 25, 26, 27, 28};
alignas(64) const uint8_t kShift3[64] = {
    0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21,
    0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21};

inline __m512i codes3_bytes(const uint8_t* p, __mmask64 load_mask) {
  const __m512i raw = _mm512_maskz_loadu_epi8(load_mask, p);
  const __m512i spread = _mm512_permutexvar_epi8(_mm512_load_si512(kSpread), raw);
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_load_si512(kShift3), spread), _mm512_set1_epi8(7));
}

// Bytes 16I..16I+15 of b as 16 floats: one zero-masked vpermb puts byte 16I+i in the low byte of dword i.
template <int I>
inline __m512 bytes_to_float(__m512i b) {
  const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(16 * I),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  return _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(0x1111111111111111ull, idx, b));
}

// out[i] = row n of the 3-bit weight . x[i] for RN rows of x (padded to Kp), zero point via the group sums.
template <int RN>
void affine3_rows_avx512(const uint32_t* row, const at::Half* srow, const at::Half* zrow, int64_t G, int64_t group,
                         const float* x, int64_t Kp, const float* xsum, float* out) {
  __m512 acc[RN];
  float corr[RN];
  for (int i = 0; i < RN; ++i) acc[i] = _mm512_setzero_ps(), corr[i] = 0.f;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row);
  for (int64_t g = 0; g < G; ++g) {
    __m512 ag[RN];
    for (int i = 0; i < RN; ++i) ag[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < group; c += 64) {
      const int64_t k = g * group + c;
      const bool full = group - c >= 64;
      const __m512i b = codes3_bytes(bytes + k * 3 / 8, full ? 0xFFFFFFull : 0xFFFull);
      const __m512 f0 = bytes_to_float<0>(b), f1 = bytes_to_float<1>(b);
      for (int i = 0; i < RN; ++i) {
        ag[i] = _mm512_fmadd_ps(f0, _mm512_loadu_ps(x + i * Kp + k), ag[i]);
        ag[i] = _mm512_fmadd_ps(f1, _mm512_loadu_ps(x + i * Kp + k + 16), ag[i]);
      }
      if (full) {
        const __m512 f2 = bytes_to_float<2>(b), f3 = bytes_to_float<3>(b);
        for (int i = 0; i < RN; ++i) {
          ag[i] = _mm512_fmadd_ps(f2, _mm512_loadu_ps(x + i * Kp + k + 32), ag[i]);
          ag[i] = _mm512_fmadd_ps(f3, _mm512_loadu_ps(x + i * Kp + k + 48), ag[i]);
        }
      }
    }
    const float s = half_to_float(srow[g]), sz = s * half_to_float(zrow[g]);
    const __m512 vs = _mm512_set1_ps(s);
    for (int i = 0; i < RN; ++i) {
      acc[i] = _mm512_fmadd_ps(ag[i], vs, acc[i]);
      corr[i] += sz * xsum[i * G + g];
    }
  }
  for (int i = 0; i < RN; ++i) out[i] = _mm512_reduce_add_ps(acc[i]) - corr[i];
}

// out[i] = row n of the codebook weight . x[i]: 16 codes per vector, the 16-entry table lookup is one vpermps.
template <int RN>
void codebook4_rows_avx512(const uint32_t* row, const at::Half* cent, int64_t G, int64_t group, const float* x,
                           int64_t K, float* out) {
  __m512 acc[RN];
  for (int i = 0; i < RN; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  for (int64_t g = 0; g < G; ++g) {
    const __m512 table = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cent + g * 16)));
    for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
      const __m512i w = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 8)));
      const __m512 wv = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_permutexvar_epi32(sel, w), shifts), table);
      for (int i = 0; i < RN; ++i) acc[i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i * K + k), acc[i]);
    }
  }
  for (int i = 0; i < RN; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

#define SPECMOE_DISPATCH_RN(rn, F, ...)                                      \
  switch (rn) {                                                               \
    case 1: F<1>(__VA_ARGS__); break; case 2: F<2>(__VA_ARGS__); break;       \
    case 3: F<3>(__VA_ARGS__); break; case 4: F<4>(__VA_ARGS__); break;       \
    case 5: F<5>(__VA_ARGS__); break; case 6: F<6>(__VA_ARGS__); break;       \
    case 7: F<7>(__VA_ARGS__); break; default: F<8>(__VA_ARGS__); break;      \
  }
#endif

// Calls fn(e, n, lo, hi) for output row n of every expert e that has rows lo..hi, in blocks of kBlockN output
// rows split over torch's threads (one task when the work is small).
template <typename F>
void for_each_weight_row(int64_t E, int64_t N, int64_t K, int64_t R, const int64_t* off, const F& fn) {
  const int64_t nblocks = (N + kBlockN - 1) / kBlockN;
  at::parallel_for(0, E * nblocks, grain(N, K, (R + E - 1) / E), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e = b / nblocks, n0 = (b % nblocks) * kBlockN, n1 = std::min(N, n0 + kBlockN);
      if (off[e + 1] == off[e]) continue;
      for (int64_t n = n0; n < n1; ++n) fn(e, n, off[e], off[e + 1]);
    }
  });
}

void check_common(const torch::Tensor& x, const torch::Tensor& offsets, const torch::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [rows, K] tensor");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous(),
              "offsets must be a contiguous int64 [E + 1] tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kInt32 && packed.is_contiguous(),
              "packed must be a contiguous int32 [E, N, words] tensor");
  TORCH_CHECK(offsets.size(0) == packed.size(0) + 1, "offsets must have E + 1 entries");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[packed.size(0)] == x.size(0), "offsets must run from 0 to the number of rows");
  for (int64_t e = 0; e < packed.size(0); ++e) TORCH_CHECK(off[e + 1] >= off[e], "offsets must not decrease");
}

}  // namespace

// y[R, N] for 3-bit affine weights; u [E, N, r] / v [E, r, K] float32 or empty (no compensator).
torch::Tensor affine3_grouped(torch::Tensor x, torch::Tensor offsets, torch::Tensor packed, torch::Tensor scale,
                              torch::Tensor zero, torch::Tensor u, torch::Tensor v, int64_t group) {
  check_common(x, offsets, packed);
  const int64_t E = packed.size(0), N = packed.size(1), W = packed.size(2), R = x.size(0), K = x.size(1);
  TORCH_CHECK(group % 32 == 0 && group > 0, "group size must be a positive multiple of 32, got ", group);
  const int64_t G = scale.size(2), Kp = G * group;
  TORCH_CHECK(Kp >= K && Kp - K < group, "scale has ", G, " groups of ", group, ", which does not cover K = ", K);
  TORCH_CHECK(W == Kp / 32 * 3, "packed has ", W, " words per row, but ", Kp, " 3-bit codes need ", Kp / 32 * 3);
  TORCH_CHECK(scale.sizes() == zero.sizes() && scale.size(0) == E && scale.size(1) == N &&
                  scale.scalar_type() == torch::kHalf && zero.scalar_type() == torch::kHalf &&
                  scale.is_contiguous() && zero.is_contiguous(),
              "scale and zero must be contiguous float16 [E, N, groups]");
  const bool comp = u.numel() > 0;
  int64_t rank = 0;
  if (comp) {
    TORCH_CHECK(u.dim() == 3 && v.dim() == 3 && u.size(0) == E && u.size(1) == N && v.size(0) == E &&
                    v.size(1) == u.size(2) && v.size(2) == K && u.scalar_type() == torch::kFloat32 &&
                    v.scalar_type() == torch::kFloat32 && u.is_contiguous() && v.is_contiguous(),
                "compensator must be contiguous float32 u [E, N, r] and v [E, r, K]");
    rank = u.size(2);
  }
  auto y = torch::empty({R, N}, x.options());  // every row belongs to one expert
  if (R == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const uint32_t* pw = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* zp = zero.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();

  // x zero-padded to Kp, its per-group sums, and the compensator's V x.
  std::vector<float> xpad(R * Kp, 0.f), xsum(R * G, 0.f), t(R * (rank > 0 ? rank : 1), 0.f);
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(&xpad[r * Kp], xp + r * K, K * sizeof(float));
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < group; ++k) s += xpad[r * Kp + g * group + k];
      xsum[r * G + g] = s;
    }
  }
  if (comp) {
    const float* vp = v.data_ptr<float>();
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = off[e]; r < off[e + 1]; ++r)
        for (int64_t j = 0; j < rank; ++j) t[r * rank + j] = dot(vp + (e * rank + j) * K, xp + r * K, K);
  }
  const float* up = comp ? u.data_ptr<float>() : nullptr;
  for_each_weight_row(E, N, K, R, off, [&](int64_t e, int64_t n, int64_t lo, int64_t hi) {
    thread_local std::vector<float> wq;
    wq.resize(group);
    const uint32_t* row = pw + (e * N + n) * W;
    if (e * N + n + 1 < E * N) prefetch(row + W, W * 4);  // the next row streams in while this one computes
    const at::Half* srow = sp + (e * N + n) * G;
    const at::Half* zrow = zp + (e * N + n) * G;
    for (int64_t r0 = lo; r0 < hi; r0 += 8) {  // up to 8 rows share each unpacked group
      const int64_t rn = std::min<int64_t>(8, hi - r0);
#if SPECMOE_AVX512
      float res[8];
      SPECMOE_DISPATCH_RN(rn, affine3_rows_avx512, row, srow, zrow, G, group, &xpad[r0 * Kp], Kp,
                          &xsum[r0 * G], res)
      for (int64_t i = 0; i < rn; ++i) {
        float out = res[i];
        if (comp) out += dot(up + (e * N + n) * rank, &t[(r0 + i) * rank], rank);
        yp[(r0 + i) * N + n] = out;
      }
      continue;
#endif
#if SPECMOE_AVX2
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
#else
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#endif
      float corr[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t g = 0; g < G; ++g) {
        const float s = half_to_float(srow[g]), sz = s * half_to_float(zrow[g]);
        unpack3(row + g * group / 32 * 3, group, wq.data());
#if SPECMOE_AVX2
        const __m256 vs = _mm256_set1_ps(s);
        for (int64_t k = 0; k < group; k += 8) {
          const __m256 w8 = _mm256_mul_ps(_mm256_loadu_ps(&wq[k]), vs);
          for (int64_t i = 0; i < rn; ++i)
            acc[i] = _mm256_fmadd_ps(w8, _mm256_loadu_ps(&xpad[(r0 + i) * Kp + g * group + k]), acc[i]);
        }
#else
        for (int64_t i = 0; i < rn; ++i) acc[i] += s * dot(wq.data(), &xpad[(r0 + i) * Kp + g * group], group);
#endif
        for (int64_t i = 0; i < rn; ++i) corr[i] += sz * xsum[(r0 + i) * G + g];
      }
      for (int64_t i = 0; i < rn; ++i) {
#if SPECMOE_AVX2
        float out = hsum(acc[i]) - corr[i];
#else
        float out = acc[i] - corr[i];
#endif
        if (comp) out += dot(up + (e * N + n) * rank, &t[(r0 + i) * rank], rank);
        yp[(r0 + i) * N + n] = out;
      }
    }
  });
  return y;
}

// y[R, N] for 4-bit codebook weights: centroids [E, N, G, 16] float16.
torch::Tensor codebook4_grouped(torch::Tensor x, torch::Tensor offsets, torch::Tensor packed,
                                torch::Tensor centroids) {
  check_common(x, offsets, packed);
  const int64_t E = packed.size(0), N = packed.size(1), W = packed.size(2), R = x.size(0), K = x.size(1);
  TORCH_CHECK(centroids.dim() == 4 && centroids.size(0) == E && centroids.size(1) == N && centroids.size(3) == 16 &&
                  centroids.scalar_type() == torch::kHalf && centroids.is_contiguous(),
              "centroids must be contiguous float16 [E, N, groups, 16]");
  const int64_t G = centroids.size(2);
  TORCH_CHECK(K % G == 0 && (K / G) % 8 == 0, "K = ", K, " must split into ", G, " groups of a multiple of 8");
  TORCH_CHECK(W == (K + 31) / 32 * 4, "packed has ", W, " words per row, but ", K, " 4-bit codes need ",
              (K + 31) / 32 * 4);
  const int64_t group = K / G;
  auto y = torch::empty({R, N}, x.options());  // every row belongs to one expert
  if (R == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const uint32_t* pw = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  const at::Half* cp = centroids.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  for_each_weight_row(E, N, K, R, off, [&](int64_t e, int64_t n, int64_t lo, int64_t hi) {
    const uint32_t* row = pw + (e * N + n) * W;
    if (e * N + n + 1 < E * N) prefetch(row + W, W * 4);  // the next row streams in while this one computes
    for (int64_t r0 = lo; r0 < hi; r0 += 8) {
      const int64_t rn = std::min<int64_t>(8, hi - r0);
#if SPECMOE_AVX512
      if (group % 16 == 0) {
        float res[8];
        SPECMOE_DISPATCH_RN(rn, codebook4_rows_avx512, row, cp + (e * N + n) * G * 16, G, group, xp + r0 * K,
                            K, res)
        for (int64_t i = 0; i < rn; ++i) yp[(r0 + i) * N + n] = res[i];
        continue;
      }
#endif
#if SPECMOE_AVX2
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
      const __m256i fifteen = _mm256_set1_epi32(15);
      for (int64_t g = 0; g < G; ++g) {
        const at::Half* c = cp + ((e * N + n) * G + g) * 16;
        const __m256 tlo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
        const __m256 thi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 8)));
        for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
          const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)row[k / 8]), shifts),
                                               fifteen);
          const __m256 w8 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx),
                                             _mm256_permutevar8x32_ps(thi, idx),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
          for (int64_t i = 0; i < rn; ++i)
            acc[i] = _mm256_fmadd_ps(w8, _mm256_loadu_ps(xp + (r0 + i) * K + k), acc[i]);
        }
      }
      for (int64_t i = 0; i < rn; ++i) yp[(r0 + i) * N + n] = hsum(acc[i]);
#else
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t g = 0; g < G; ++g) {
        float table[16];
        for (int j = 0; j < 16; ++j) table[j] = half_to_float(cp[((e * N + n) * G + g) * 16 + j]);
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
          const float w = table[(row[k / 8] >> (4 * (k % 8))) & 15u];
          for (int64_t i = 0; i < rn; ++i) acc[i] += w * xp[(r0 + i) * K + k];
        }
      }
      for (int64_t i = 0; i < rn; ++i) yp[(r0 + i) * N + n] = acc[i];
#endif
    }
  });
  return y;
}

// Dequantized float32 [N, K] of one 3-bit affine matrix (+ U V): the prefill path (then a dense matmul).
torch::Tensor affine3_dequant(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t K,
                              int64_t group) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kInt32 && packed.is_contiguous(),
              "packed must be a contiguous int32 [N, words] tensor");
  const int64_t N = packed.size(0), W = packed.size(1), G = scale.size(1), Kp = G * group;
  TORCH_CHECK(group % 32 == 0 && Kp >= K && W == Kp / 32 * 3 && scale.scalar_type() == torch::kHalf &&
                  zero.scalar_type() == torch::kHalf && scale.is_contiguous() && zero.is_contiguous() &&
                  scale.size(0) == N && zero.sizes() == scale.sizes(),
              "packed/scale/zero do not describe a 3-bit [", N, ", ", K, "] matrix with groups of ", group);
  auto out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const uint32_t* pw = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* zp = zero.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> q(Kp);
    for (int64_t n = n0; n < n1; ++n) {
      unpack3(pw + n * W, Kp, q.data());
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / group;
        op[n * K + k] = (q[k] - half_to_float(zp[n * G + g])) * half_to_float(sp[n * G + g]);
      }
    }
  });
  return out;
}

std::string isa() { return SPECMOE_AVX512 ? "avx512" : (SPECMOE_AVX2 ? "avx2" : "scalar"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affine3_grouped", &affine3_grouped, "grouped 3-bit affine matmul (CPU)");
  m.def("codebook4_grouped", &codebook4_grouped, "grouped 4-bit codebook matmul (CPU)");
  m.def("affine3_dequant", &affine3_dequant, "3-bit affine dequantization (CPU)");
  m.def("isa", &isa, "the instruction set the kernels were compiled for");
}

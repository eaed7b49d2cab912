// CPU kernels for the packed quantized formats (see qkernels/packing.py and qkernels/reference.py).
//
// Both kernels are grouped (the MoE form): x_sorted [R, K] fp32 holds the rows of every expert, expert e owning
// rows offsets[e]..offsets[e+1]; a dense layer is the case E = 1. Weights are [E, N, ...]; y [R, N] fp32.
//
// affine3: 3-bit codes, 32 per three int32 words (a code may straddle two words), fp16 scale/zero per group:
//   y[r, n] = sum_g s[n,g] * sum_{k in g} q[n,k] x[r,k]  -  sum_g s[n,g] z[n,g] * xsum[r,g]
//   so the inner loop is an FMA of unpacked codes with x, shared by all rows of the expert; the scale costs one
//   FMA per group and the zero point one scalar per group. An optional low-rank compensator adds U_e (V_e x).
// codebook4: 4-bit indices, 8 per int32 word, into a 16-entry fp16 codebook per (row, group):
//   y[r, n] = sum_k c[n, g(k), idx[n,k]] x[r,k]; the lookup is two in-register permutes and a blend.
//
// dense_rows: float32 y[R, N] = x[R, K] @ w[N, K]^T for a few rows (the native engine's unquantized linears in a
//   decode step): each weight row is read once for every row of x, where the BLAS may take a short x @ W^T as one
//   matrix-vector product per row.
//
// Decode is memory-bound: each weight word is read once and used for every row of its expert (up to R rows;
// callers send prefill-sized batches to dequantize + matmul instead). Work is split over (expert, block of N)
// between torch's threads.
//
// Code paths, chosen at run time by the CPU's flags (not the build machine's), or forced with set_isa:
//   avx512: AVX-512 F/BW/VBMI/VNNI, the AVX2 path's integer method on 512-bit vectors (same int16 x and tables, so
//           the same results): vpermb + vpmultishiftqb put 32 3-bit codes in 16-bit lanes, vpermw looks up 32
//           codebook entries, vpdpwssd multiplies and accumulates 32 pairs;
//   avx2:   AVX2 + FMA + F16C, integer dot products: x is rounded to int16 per block (max|x| / 32767 per group
//           for 3-bit, / 16383 per block of up to 128 for codebooks: half a step is 1.5e-5 or 3e-5 of a block's
//           largest |x|), and vpmaddwd multiplies 16 codes by 16 x values at once. 3-bit: one shuffle, one multiply
//           and one shift put 16 codes in 16-bit lanes. Codebook (groups of a multiple of 32): the 16 centroids as
//           int16 (max|c| / 4095) in a low-byte and a high-byte table, two vpshufb per 32 codes; other groups take
//           fp32 permutes of the table. Several weight rows (or x rows) per pass share each load;
//   scalar: plain loops (any CPU, e.g. ARM); the reference for the others.
// Every path is compiled into the one extension (GCC target pragmas), so one build serves every node.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define SPECMOE_X86 1
#include <immintrin.h>
#else
#define SPECMOE_X86 0
#endif

namespace {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

int best_isa() {
#if SPECMOE_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");  // F16C comes with both
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni"))
    return kAvx512;
  if (avx2) return kAvx2;
#endif
  return kScalar;
}

std::atomic<int> g_isa{-1};

int active_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = best_isa();
    g_isa.store(isa);
  }
  return isa;
}

constexpr int64_t kBlockN = 16;
constexpr int64_t kCodesPerTask = 1 << 16;  // below this much work per task a second thread costs more than it saves

int64_t grain(int64_t N, int64_t K, int64_t rows_per_expert) {
  const int64_t per_block = kBlockN * K * std::max<int64_t>(1, rows_per_expert);
  return std::max<int64_t>(1, kCodesPerTask / std::max<int64_t>(1, per_block));
}

inline float half_to_float(at::Half h) { return static_cast<float>(h); }

// Asks for `bytes` from p into the cache ahead of use (the weights stream from memory once per call).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

// What a block of output rows needs: x padded to Kp with its group sums (affine3), V x per row (compensator).
struct Affine3Args {
  const float* xpad;  // [R, Kp] (the scalar path)
  const float* xsum;  // [R, G]: x's group sums (the integer paths: the dequantized x's)
  const int16_t* xq;  // [R, Kp] x quantized per group (the integer paths; null on the scalar one)
  const float* xscale;  // [R, G] its scales
  const float* t;     // [R, rank] (V_e x)
  const float* u;     // [E, N, rank] or null
  const uint32_t* packed;  // [E, N, W]
  const at::Half* scale;   // [E, N, G]
  const at::Half* zero;
  float* y;  // [R, N]
  int64_t E, N, W, G, group, Kp, rank;
};

struct Codebook4Args {
  const float* x;  // [R, K]
  const int16_t* xq;  // [R, K]: x quantized per block, in the integer path's order (null when none runs)
  const float* xscale;  // [R, K / block] its scales
  const uint32_t* packed;  // [E, N, W]
  const at::Half* cent;    // [E, N, G, 16]
  float* y;
  int64_t E, N, W, G, group, K, block;
};

// Walks weight rows n0..n1 of expert e against x rows lo..hi in tiles of rn <= max_rn x rows by up to
// rb_for[rn - 1] weight rows; tile(n, rb, r0, rn) computes one. While a tile runs, the next one's packed rows
// (they follow its own in memory) are asked for.
template <typename Tile>
void for_each_tile(int64_t e, int64_t N, int64_t E, int64_t W, const uint32_t* packed, int64_t n0, int64_t n1,
                   int64_t lo, int64_t hi, int max_rn, const int* rb_for, const Tile& tile) {
  for (int64_t r0 = lo; r0 < hi;) {
    const int rn = (int)std::min<int64_t>(hi - r0, max_rn);
    for (int64_t n = n0; n < n1;) {
      const int rb = (int)std::min<int64_t>(rb_for[rn - 1], n1 - n);
      if (e * N + n + 2 * rb <= E * N) prefetch(packed + (e * N + n + rb) * W, rb * W * 4);
      tile(n, rb, r0, rn);
      n += rb;
    }
    r0 += rn;
  }
}


using Affine3Block = void (*)(const Affine3Args&, int64_t e, int64_t n0, int64_t n1, int64_t lo, int64_t hi);
using Codebook4Block = void (*)(const Codebook4Args&, int64_t e, int64_t n0, int64_t n1, int64_t lo, int64_t hi);

// ------------------------------------------------------------------------------------------------ scalar
namespace scalar {

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
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 8; ++i) out[32 * b + 8 * j + i] = (float)((c[j] >> (3 * i)) & 7u);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void affine3_block(const Affine3Args& a, int64_t e, int64_t n0, int64_t n1, int64_t lo, int64_t hi) {
  std::vector<float> wq(a.group);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row_id = e * a.N + n;
    const uint32_t* row = a.packed + row_id * a.W;
    const at::Half* srow = a.scale + row_id * a.G;
    const at::Half* zrow = a.zero + row_id * a.G;
    for (int64_t r = lo; r < hi; ++r) {
      float acc = 0.f, corr = 0.f;
      for (int64_t g = 0; g < a.G; ++g) {
        const float s = half_to_float(srow[g]);
        unpack3(row + g * a.group / 32 * 3, a.group, wq.data());
        acc += s * dot(wq.data(), a.xpad + r * a.Kp + g * a.group, a.group);
        corr += s * half_to_float(zrow[g]) * a.xsum[r * a.G + g];
      }
      float out = acc - corr;
      if (a.u) out += dot(a.u + row_id * a.rank, a.t + r * a.rank, a.rank);
      a.y[r * a.N + n] = out;
    }
  }
}

void codebook4_block(const Codebook4Args& a, int64_t e, int64_t n0, int64_t n1, int64_t lo, int64_t hi) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row_id = e * a.N + n;
    const uint32_t* row = a.packed + row_id * a.W;
    for (int64_t r = lo; r < hi; ++r) {
      float acc = 0.f;
      for (int64_t g = 0; g < a.G; ++g) {
        float table[16];
        for (int j = 0; j < 16; ++j) table[j] = half_to_float(a.cent[(row_id * a.G + g) * 16 + j]);
        for (int64_t k = g * a.group; k < (g + 1) * a.group; ++k)
          acc += table[(row[k / 8] >> (4 * (k % 8))) & 15u] * a.x[r * a.K + k];
      }
      a.y[r * a.N + n] = acc;
    }
  }
}

void dense_block(const float* x, const float* w, float* y, int64_t R, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < R; ++r) y[r * N + n] = dot(w + n * K, x + r * K, K);
}

}  // namespace scalar

#if SPECMOE_X86
// ------------------------------------------------------------------------------------------------ avx2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

inline float h2f(at::Half h) { return _cvtsh_ss(h.x); }  // F16C, not the generic bit twiddling

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Integer dot products on 16-bit activations. x comes quantized per block (`quantize_x16`): q = round(x / s) with
// s = max|x| / limit, so each value is off by at most s / 2 (1.5e-5 of the block's largest |x| at limit 32767).
// vpmaddwd multiplies 16 int16 pairs and adds neighbours into int32; a block's int32 sums are converted and scaled
// once. On AVX2 this beats unpacking codes to floats: one multiply-add per 16 codes instead of two conversions and
// two FMAs per 16, and the unpack stays in 16-bit lanes.
//
// 3-bit codes, 16 at a time: the 16 codes k..k+15 (k % 16 == 0) span the 6 bytes at 3k/8. vpshufb gives lane i the
// 16-bit window of bytes (3i/8, 3i/8 + 1), vpmullw by 2^(13 - s_i) moves the code at bit s_i = 3i % 8 of it to bits
// 13..15, and one shift right by 13 leaves the code. Reads 8 bytes, so the caller gives the tensor's last row a
// copy with a spare word.
alignas(32) const int8_t kWin3[32] = {0, 1, 0, 1, 0, 1, 1, 2, 1, 2, 1, 2, 2, 3, 2, 3,
                                      3, 4, 3, 4, 3, 4, 4, 5, 4, 5, 4, 5, 5, 6, 5, 6};
alignas(32) const int16_t kMul3[16] = {8192, 1024, 128, 4096, 512, 64, 2048, 256,
                                       8192, 1024, 128, 4096, 512, 64, 2048, 256};

inline __m256i codes16(const uint8_t* bytes, int64_t k, __m256i win, __m256i mul) {
  int64_t v;
  std::memcpy(&v, bytes + k / 16 * 6, 8);
  return _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(_mm256_set1_epi64x(v), win), mul), 13);
}

// out[b][i] = weight row b . x row i for RB weight rows and RN x rows (int16, padded to Kp, one scale per group):
//   sum_g s_bg * (sx_ig * sum_k q_bk xq_ik - z_bg * xsum_ig), xsum the dequantized x's group sums.
template <int RB, int RN>
void affine3_tile(const uint8_t* const* rows, const at::Half* const* srow, const at::Half* const* zrow, int64_t G,
                  int64_t group, const int16_t* xq, int64_t Kp, const float* xscale, const float* xsum, float* out) {
  const __m256i win = _mm256_load_si256(reinterpret_cast<const __m256i*>(kWin3));
  const __m256i mul = _mm256_load_si256(reinterpret_cast<const __m256i*>(kMul3));
  __m256 acc[RB][RN];
  float corr[RB][RN];
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) acc[b][i] = _mm256_setzero_ps(), corr[b][i] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    __m256i ag[RB][RN];
    for (int b = 0; b < RB; ++b)
      for (int i = 0; i < RN; ++i) ag[b][i] = _mm256_setzero_si256();
    for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
      __m256i xv[RN];
      for (int i = 0; i < RN; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * Kp + k));
      for (int b = 0; b < RB; ++b) {
        const __m256i q = codes16(rows[b], k, win, mul);
        for (int i = 0; i < RN; ++i) ag[b][i] = _mm256_add_epi32(ag[b][i], _mm256_madd_epi16(q, xv[i]));
      }
    }
    for (int b = 0; b < RB; ++b) {
      const float s = h2f(srow[b][g]), sz = s * h2f(zrow[b][g]);
      for (int i = 0; i < RN; ++i) {
        acc[b][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ag[b][i]), _mm256_set1_ps(s * xscale[i * G + g]), acc[b][i]);
        corr[b][i] += sz * xsum[i * G + g];
      }
    }
  }
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) out[b * RN + i] = hsum(acc[b][i]) - corr[b][i];
}

#define A3TILE(RB, RN) affine3_tile<RB, RN>(rows, srow, zrow, a.G, a.group, xq, a.Kp, xsc, xs, out)

// Tiles of up to 8 int32 + 8 float accumulators: 4 weight rows for one x row (decode), 2 x 2, or 1 x 3/4.
void affine3_block(const Affine3Args& a, int64_t e, int64_t n0, int64_t n1, int64_t lo, int64_t hi) {
  static const int rb_for[4] = {4, 2, 1, 1};
  thread_local std::vector<uint32_t> last;  // the tensor's last row, with a spare word (codes16 reads 8 bytes)
  const uint8_t* rows[4];
  const at::Half* srow[4];
  const at::Half* zrow[4];
  float out[4];
  for_each_tile(e, a.N, a.E, a.W, a.packed, n0, n1, lo, hi, 4, rb_for, [&](int64_t n, int rb, int64_t r0, int rn) {
    for (int b = 0; b < rb; ++b) {
      const int64_t row_id = e * a.N + n + b;
      const uint32_t* row = a.packed + row_id * a.W;
      if (row_id == a.E * a.N - 1) {
        last.assign(row, row + a.W);
        last.push_back(0);
        row = last.data();
      }
      rows[b] = reinterpret_cast<const uint8_t*>(row);
      srow[b] = a.scale + row_id * a.G;
      zrow[b] = a.zero + row_id * a.G;
    }
    const int16_t* xq = a.xq + r0 * a.Kp;
    const float* xsc = a.xscale + r0 * a.G;
    const float* xs = a.xsum + r0 * a.G;
    switch (rb * 10 + rn) {
      case 41: A3TILE(4, 1); break;
      case 31: A3TILE(3, 1); break;
      case 21: A3TILE(2, 1); break;
      case 11: A3TILE(1, 1); break;
      case 22: A3TILE(2, 2); break;
      case 12: A3TILE(1, 2); break;
      case 13: A3TILE(1, 3); break;
      default: A3TILE(1, 4); break;
    }
    for (int b = 0; b < rb; ++b)  // plus the compensator U_e (V_e x) where there is one
      for (int i = 0; i < rn; ++i) {
        const int64_t row_id = e * a.N + n + b;
        float v = out[b * rn + i];
        if (a.u) v += dot(a.u + row_id * a.rank, a.t + (r0 + i) * a.rank, a.rank);
        a.y[(r0 + i) * a.N + n + b] = v;
      }
  });
}
#undef A3TILE

// out[b][i] = codebook weight row b . x row i: 8 codes a step, looked up in the row's fp32 table of its group (two
// permutes of 8 entries and a blend on the index's bit 3).
template <int RB, int RN>
void codebook4_tile(const uint32_t* const* rows, const at::Half* const* cent, int64_t G, int64_t group,
                    const float* x, int64_t K, float* out) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  __m256 acc[RB][RN];
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) acc[b][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 tlo[RB], thi[RB];
    for (int b = 0; b < RB; ++b) {
      const at::Half* c = cent[b] + g * 16;
      tlo[b] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
      thi[b] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 8)));
    }
    for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
      __m256 xv[RN];
      for (int i = 0; i < RN; ++i) xv[i] = _mm256_loadu_ps(x + i * K + k);
      for (int b = 0; b < RB; ++b) {
        const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32((int)rows[b][k / 8]), shifts);  // low 3 bits used
        const __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo[b], idx), _mm256_permutevar8x32_ps(thi[b], idx),
                                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
        for (int i = 0; i < RN; ++i) acc[b][i] = _mm256_fmadd_ps(w, xv[i], acc[b][i]);
      }
    }
  }
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) out[b * RN + i] = hsum(acc[b][i]);
}

// The integer path for groups of a multiple of 32: a group's 16 fp16 centroids as int16 (scale max|c| / 4095, so
// each is off by at most 1.2e-4 of the largest; fp16 itself rounds by up to 4.9e-4 of each value), split into a
// low-byte and a high-byte table, so 32 lookups are two vpshufb and two unpacks. 16 packed bytes hold 32 codes,
// byte j codes 2j (low nibble) and 2j + 1 (high): the lookups come out as codes 0,2,..,14 | 1,3,..,15 and
// 16,18,..,30 | 17,19,..,31, and x is quantized in that order (`quantize_x16`, limit 16383: a block of 128 sums to
// at most 2^30 in each int32 lane). Returns the table's scale.
constexpr float kTableLimit = 4095.f;

inline float table16(const at::Half* c, __m256i& tlo, __m256i& thi) {
  const __m256 t0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
  const __m256 t1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 8)));
  const __m256 sign = _mm256_set1_ps(-0.f), inf = _mm256_set1_ps(INFINITY);
  const __m256 a0 = _mm256_andnot_ps(sign, t0), a1 = _mm256_andnot_ps(sign, t1);
  const __m256 m8 = _mm256_max_ps(a0, a1);
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float mx = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  const bool bad = _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(a0, inf, _CMP_NLT_UQ),
                                                   _mm256_cmp_ps(a1, inf, _CMP_NLT_UQ)));  // NaN or inf
  if (bad || !(mx > 0.f)) {  // all zero: a zero table; not finite: NaN, as the float paths give
    tlo = thi = _mm256_setzero_si256();
    return bad ? NAN : 0.f;
  }
  const __m256 inv = _mm256_set1_ps(kTableLimit / mx);
  const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(t0, inv)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(t1, inv));
  __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);  // int16 entries 0..7 | 8..15
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  p = _mm256_shuffle_epi8(p, split);  // lane 0: low bytes of 0..7, high bytes of 0..7; lane 1: the same for 8..15
  const __m128i a = _mm256_castsi256_si128(p), b = _mm256_extracti128_si256(p, 1);
  tlo = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(a, b));
  thi = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(a, b));
  return mx / kTableLimit;
}

// out[b][i] = codebook weight row b . x row i (int16, permuted, one scale per block of `block` values).
template <int RB, int RN>
void codebook4_tile_i16(const uint8_t* const* rows, const at::Half* const* cent, int64_t G, int64_t group,
                        int64_t block, const int16_t* xq, int64_t K, const float* xscale, float* out) {
  const __m128i nib = _mm_set1_epi8(0x0F);
  const int64_t B = K / block;
  __m256 acc[RB][RN];
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) acc[b][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i tlo[RB], thi[RB];
    float cs[RB];
    for (int b = 0; b < RB; ++b) cs[b] = table16(cent[b] + g * 16, tlo[b], thi[b]);
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += block) {
      __m256i ai[RB][RN];
      for (int b = 0; b < RB; ++b)
        for (int i = 0; i < RN; ++i) ai[b][i] = _mm256_setzero_si256();
      for (int64_t k = k0; k < k0 + block; k += 32) {
        __m256i x0[RN], x1[RN];
        for (int i = 0; i < RN; ++i) {
          x0[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + k));
          x1[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + k + 16));
        }
        for (int b = 0; b < RB; ++b) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[b] + k / 2));
          const __m256i idx = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nib), _mm_and_si128(v, nib));
          const __m256i lo = _mm256_shuffle_epi8(tlo[b], idx), hi = _mm256_shuffle_epi8(thi[b], idx);
          const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);
          for (int i = 0; i < RN; ++i)
            ai[b][i] = _mm256_add_epi32(ai[b][i], _mm256_add_epi32(_mm256_madd_epi16(w0, x0[i]),
                                                                   _mm256_madd_epi16(w1, x1[i])));
        }
      }
      for (int b = 0; b < RB; ++b)
        for (int i = 0; i < RN; ++i)
          acc[b][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[b][i]), _mm256_set1_ps(cs[b] * xscale[i * B + k0 / block]),
                                      acc[b][i]);
    }
  }
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) out[b * RN + i] = hsum(acc[b][i]);
}

// Tiles: the integer path (groups of a multiple of 32) 2 weight rows x 1 x row or 1 x 2; the float permutes 4 x 1,
// 2 x 2 or 1 x 2.
void codebook4_block(const Codebook4Args& a, int64_t e, int64_t n0, int64_t n1, int64_t lo, int64_t hi) {
  static const int rb_integer[2] = {2, 1}, rb_float[2] = {4, 2};
  const bool integer = a.xq != nullptr;
  const uint32_t* rows[4] = {};
  const at::Half* cent[4];
  float out[4];
  for_each_tile(e, a.N, a.E, a.W, a.packed, n0, n1, lo, hi, 2, integer ? rb_integer : rb_float,
                [&](int64_t n, int rb, int64_t r0, int rn) {
    for (int b = 0; b < rb; ++b) {
      const int64_t row_id = e * a.N + n + b;
      rows[b] = a.packed + row_id * a.W;
      cent[b] = a.cent + row_id * a.G * 16;
    }
    if (integer) {
      const uint8_t* bytes[2] = {reinterpret_cast<const uint8_t*>(rows[0]), reinterpret_cast<const uint8_t*>(rows[1])};
      const int16_t* xq = a.xq + r0 * a.K;
      const float* xsc = a.xscale + r0 * (a.K / a.block);
      switch (rb * 10 + rn) {
        case 21: codebook4_tile_i16<2, 1>(bytes, cent, a.G, a.group, a.block, xq, a.K, xsc, out); break;
        case 11: codebook4_tile_i16<1, 1>(bytes, cent, a.G, a.group, a.block, xq, a.K, xsc, out); break;
        default: codebook4_tile_i16<1, 2>(bytes, cent, a.G, a.group, a.block, xq, a.K, xsc, out); break;
      }
    } else {
      const float* x = a.x + r0 * a.K;
      switch (rb * 10 + rn) {
        case 41: codebook4_tile<4, 1>(rows, cent, a.G, a.group, x, a.K, out); break;
        case 31: codebook4_tile<3, 1>(rows, cent, a.G, a.group, x, a.K, out); break;
        case 21: codebook4_tile<2, 1>(rows, cent, a.G, a.group, x, a.K, out); break;
        case 11: codebook4_tile<1, 1>(rows, cent, a.G, a.group, x, a.K, out); break;
        case 22: codebook4_tile<2, 2>(rows, cent, a.G, a.group, x, a.K, out); break;
        default: codebook4_tile<1, 2>(rows, cent, a.G, a.group, x, a.K, out); break;
      }
    }
    for (int b = 0; b < rb; ++b)
      for (int i = 0; i < rn; ++i) a.y[(r0 + i) * a.N + n + b] = out[b * rn + i];
  });
}

// Dense float32 weights, a few x rows (a decode step): y[i, n] = w[n] . x[i] for weight rows n0..n1, every weight row
// read once for all R rows (the BLAS takes a short x @ W^T as one matrix-vector product per row on some CPUs).
// With two or more x rows the FMAs take about as long as the weights take to stream in, and the two only overlap
// when the weights are asked for well ahead: while a tile runs, it prefetches the next tile's rows (they follow its
// own in memory), as many bytes per step as it reads. On Zen 1 this took 4 rows from 1.3-1.8x one row's time to
// 1.1-1.3x; one row gains nothing (it is memory-bound either way).
template <int RB, int RN>
inline void dense_tile(const float* w, int64_t K, const float* x, float* y, int64_t N) {
  __m256 acc[RB][RN];
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) acc[b][i] = _mm256_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(w + RB * K);  // the next tile
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (RN > 1)
      for (int line = 0; line < RB * 32; line += 64) __builtin_prefetch(ahead + RB * k * 4 + line, 0, 3);
    __m256 xv[RN];
    for (int i = 0; i < RN; ++i) xv[i] = _mm256_loadu_ps(x + i * K + k);
    for (int b = 0; b < RB; ++b) {
      const __m256 wv = _mm256_loadu_ps(w + b * K + k);
      for (int i = 0; i < RN; ++i) acc[b][i] = _mm256_fmadd_ps(wv, xv[i], acc[b][i]);
    }
  }
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) {
      float s = hsum(acc[b][i]);
      for (int64_t kk = k; kk < K; ++kk) s += w[b * K + kk] * x[i * K + kk];
      y[i * N + b] = s;
    }
}

// Weight rows n0..n1 against all R x rows: 8 weight rows per pass for one x row, 4 for two, 2 for up to four x rows
// at a time (at most 8 accumulators), the weight rows of a pass staying in L1 while every x row uses them.
void dense_block(const float* x, const float* w, float* y, int64_t R, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (R == 1) {
    for (; n + 8 <= n1; n += 8) dense_tile<8, 1>(w + n * K, K, x, y + n, N);
  } else if (R == 2) {
    for (; n + 4 <= n1; n += 4) dense_tile<4, 2>(w + n * K, K, x, y + n, N);
  } else {
    for (; n + 2 <= n1; n += 2)
      for (int64_t r = 0; r < R; r += 4) {
        const int64_t rn = std::min<int64_t>(4, R - r);
        const float* xr = x + r * K;
        float* yr = y + r * N + n;
        if (rn == 4) dense_tile<2, 4>(w + n * K, K, xr, yr, N);
        else if (rn == 3) dense_tile<2, 3>(w + n * K, K, xr, yr, N);
        else if (rn == 2) dense_tile<2, 2>(w + n * K, K, xr, yr, N);
        else dense_tile<2, 1>(w + n * K, K, xr, yr, N);
      }
  }
  for (; n < n1; ++n)
    for (int64_t r = 0; r < R; ++r) dense_tile<1, 1>(w + n * K, K, x + r * K, y + r * N + n, N);
}

}  // namespace avx2
#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------ avx512
// The AVX2 path's integer method on 512-bit vectors: the same int16 x (same blocks and limits) and int16 codebook
// tables, so both paths give the same results to float rounding. vpdpwssd (VNNI) multiplies 32 int16 pairs and adds
// neighbours into the int32 accumulator in one instruction.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")
namespace avx512 {
// 3-bit codes: 64 codes span 24 bytes. For the 32 codes of half h, vpermb gives qword lane L the 8 stream bytes from
// byte 12h + 3L/2 (its 4 codes start at bit 4 (L odd) or 0 of them), and vpmultishiftqb moves code j to byte 2j of
// the lane; masking each 16-bit lane with 7 leaves 32 codes in 16-bit lanes, in order.
struct Spread3 {
  alignas(64) uint8_t perm[2][64];
  alignas(64) uint8_t shift[64];
  Spread3() {
    for (int h = 0; h < 2; ++h)
      for (int L = 0; L < 8; ++L)
        for (int t = 0; t < 8; ++t) perm[h][8 * L + t] = (uint8_t)(12 * h + 3 * L / 2 + t);
    for (int L = 0; L < 8; ++L)
      for (int t = 0; t < 8; ++t) shift[8 * L + t] = (uint8_t)(t % 2 ? 0 : 4 * (L % 2) + 3 * (t / 2));
  }
};
const Spread3 kSpread3;
const int kRbFor[4] = {4, 4, 2, 2};  // weight rows per tile for 1-4 x rows

inline __m512i codes3_words(__m512i raw, __m512i perm, __m512i shift) {
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(perm, raw)),
                          _mm512_set1_epi16(7));
}

// The sums of a, b, c, d in one vector: two unpacks and a shuffle pair put the four in each 128-bit lane, and the
// lanes are added (the decode tile's four rows at once, instead of four full reductions).
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0+a2 b0+b2 a1+a3 b1+b3
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));  // a b c d per lane
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// out[b][i] = weight row b . x row i for RB weight rows and RN x rows (int16, padded to Kp, one scale per group), as
// avx2::affine3_tile, plus the compensator u_b . t_i (rank > 0): it is added to the row's float accumulator before
// the one horizontal sum, so a small expert's rank-8 compensator costs one masked FMA per row. A group of a multiple
// of 32 but not of 64 ends with one 32-code step. Loads are masked to the row's bytes, so no spare word is needed.
template <int RB, int RN>
void affine3_tile(const uint8_t* const* rows, const at::Half* const* srow, const at::Half* const* zrow, int64_t G,
                  int64_t group, const int16_t* xq, int64_t Kp, const float* xscale, const float* xsum,
                  const float* const* urow, const float* t, int64_t rank, float* out) {
  const __m512i p0 = _mm512_load_si512(kSpread3.perm[0]), p1 = _mm512_load_si512(kSpread3.perm[1]);
  const __m512i sh = _mm512_load_si512(kSpread3.shift);
  __m512 acc[RB][RN];
  float corr[RB][RN];
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) acc[b][i] = _mm512_setzero_ps(), corr[b][i] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    __m512i ag[RB][RN];
    for (int b = 0; b < RB; ++b)
      for (int i = 0; i < RN; ++i) ag[b][i] = _mm512_setzero_si512();
    int64_t k = g * group;
    const int64_t end = k + group;
    for (; k + 64 <= end; k += 64) {
      __m512i x0[RN], x1[RN];
      for (int i = 0; i < RN; ++i) {
        x0[i] = _mm512_loadu_si512(xq + i * Kp + k);
        x1[i] = _mm512_loadu_si512(xq + i * Kp + k + 32);
      }
      for (int b = 0; b < RB; ++b) {
        const __m512i raw = _mm512_maskz_loadu_epi8(0xFFFFFFull, rows[b] + k / 8 * 3);
        const __m512i q0 = codes3_words(raw, p0, sh), q1 = codes3_words(raw, p1, sh);
        for (int i = 0; i < RN; ++i)
          ag[b][i] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(ag[b][i], q0, x0[i]), q1, x1[i]);
      }
    }
    if (k < end) {  // 32 codes left
      __m512i x0[RN];
      for (int i = 0; i < RN; ++i) x0[i] = _mm512_loadu_si512(xq + i * Kp + k);
      for (int b = 0; b < RB; ++b) {
        const __m512i q0 = codes3_words(_mm512_maskz_loadu_epi8(0xFFFull, rows[b] + k / 8 * 3), p0, sh);
        for (int i = 0; i < RN; ++i) ag[b][i] = _mm512_dpwssd_epi32(ag[b][i], q0, x0[i]);
      }
    }
    for (int b = 0; b < RB; ++b) {
      const float s = avx2::h2f(srow[b][g]), sz = s * avx2::h2f(zrow[b][g]);
      for (int i = 0; i < RN; ++i) {
        acc[b][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ag[b][i]), _mm512_set1_ps(s * xscale[i * G + g]), acc[b][i]);
        corr[b][i] += sz * xsum[i * G + g];
      }
    }
  }
  for (int64_t j = 0; j < rank; j += 16) {
    const __mmask16 m = rank - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (rank - j)) - 1);
    __m512 tv[RN];
    for (int i = 0; i < RN; ++i) tv[i] = _mm512_maskz_loadu_ps(m, t + i * rank + j);
    for (int b = 0; b < RB; ++b) {
      const __m512 uv = _mm512_maskz_loadu_ps(m, urow[b] + j);
      for (int i = 0; i < RN; ++i) acc[b][i] = _mm512_fmadd_ps(uv, tv[i], acc[b][i]);
    }
  }
  if constexpr (RB == 4 && RN == 1) {
    _mm_storeu_ps(out, _mm_sub_ps(reduce4(acc[0][0], acc[1][0], acc[2][0], acc[3][0]),
                                  _mm_setr_ps(corr[0][0], corr[1][0], corr[2][0], corr[3][0])));
  } else {
    for (int b = 0; b < RB; ++b)
      for (int i = 0; i < RN; ++i) out[b * RN + i] = _mm512_reduce_add_ps(acc[b][i]) - corr[b][i];
  }
}

#define A3TILE(RB, RN) affine3_tile<RB, RN>(rows, srow, zrow, a.G, a.group, xq, a.Kp, xsc, xs, urow, t, rank, out)

// Tiles: 4 weight rows for one or two x rows (decode, two-token steps), 2 for three or four.
void affine3_block(const Affine3Args& a, int64_t e, int64_t n0, int64_t n1, int64_t lo, int64_t hi) {
  const uint8_t* rows[4];
  const at::Half* srow[4];
  const at::Half* zrow[4];
  const float* urow[4] = {};
  const int64_t rank = a.u ? a.rank : 0;
  float out[8];
  for_each_tile(e, a.N, a.E, a.W, a.packed, n0, n1, lo, hi, 4, kRbFor, [&](int64_t n, int rb, int64_t r0, int rn) {
    for (int b = 0; b < rb; ++b) {
      const int64_t row_id = e * a.N + n + b;
      rows[b] = reinterpret_cast<const uint8_t*>(a.packed + row_id * a.W);
      srow[b] = a.scale + row_id * a.G;
      zrow[b] = a.zero + row_id * a.G;
      if (rank) urow[b] = a.u + row_id * rank;
    }
    const float* t = a.t + r0 * a.rank;
    const int16_t* xq = a.xq + r0 * a.Kp;
    const float* xsc = a.xscale + r0 * a.G;
    const float* xs = a.xsum + r0 * a.G;
    switch (rb * 10 + rn) {
      case 41: A3TILE(4, 1); break; case 31: A3TILE(3, 1); break; case 21: A3TILE(2, 1); break;
      case 11: A3TILE(1, 1); break; case 42: A3TILE(4, 2); break; case 32: A3TILE(3, 2); break;
      case 22: A3TILE(2, 2); break; case 12: A3TILE(1, 2); break; case 23: A3TILE(2, 3); break;
      case 13: A3TILE(1, 3); break; case 24: A3TILE(2, 4); break; default: A3TILE(1, 4); break;
    }
    for (int b = 0; b < rb; ++b)  // the compensator is in already
      for (int i = 0; i < rn; ++i) a.y[(r0 + i) * a.N + n + b] = out[b * rn + i];
  });
}
#undef A3TILE

// A group's 16 centroids as int16 (as avx2::table16: max|c| / 4095) in the low 16 words of a zmm, for vpermw.
inline float table16(const at::Half* c, __m512i& t) {
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
  const __m512 a = _mm512_abs_ps(f);
  const bool bad = _mm512_cmp_ps_mask(a, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ) != 0;  // NaN or inf
  const float mx = bad ? 0.f : _mm512_reduce_max_ps(a);
  if (bad || !(mx > 0.f)) {
    t = _mm512_setzero_si512();
    return bad ? NAN : 0.f;
  }
  const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(f, _mm512_set1_ps(avx2::kTableLimit / mx)));
  t = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(q));
  return mx / avx2::kTableLimit;
}

// out[b][i] = codebook weight row b . x row i (groups of a multiple of 64): 32 packed bytes (64 codes) widen to 32
// words; vpermw looks up the low nibbles (codes 0, 2, .., 62) and the high ones (1, 3, .., 63), and x comes
// quantized in that order (even codes of each 64, then odd).
template <int RB, int RN>
void codebook4_tile(const uint8_t* const* rows, const at::Half* const* cent, int64_t G, int64_t group,
                    int64_t block, const int16_t* xq, int64_t K, const float* xscale, float* out) {
  const __m512i nib = _mm512_set1_epi16(0x0F);
  const int64_t B = K / block;
  __m512 acc[RB][RN];
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) acc[b][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i tab[RB];
    float cs[RB];
    for (int b = 0; b < RB; ++b) cs[b] = table16(cent[b] + g * 16, tab[b]);
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += block) {
      __m512i ai[RB][RN];
      for (int b = 0; b < RB; ++b)
        for (int i = 0; i < RN; ++i) ai[b][i] = _mm512_setzero_si512();
      for (int64_t k = k0; k < k0 + block; k += 64) {
        __m512i x0[RN], x1[RN];
        for (int i = 0; i < RN; ++i) {
          x0[i] = _mm512_loadu_si512(xq + i * K + k);
          x1[i] = _mm512_loadu_si512(xq + i * K + k + 32);
        }
        for (int b = 0; b < RB; ++b) {
          const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[b] + k / 2)));
          const __m512i w0 = _mm512_permutexvar_epi16(_mm512_and_si512(v, nib), tab[b]);
          const __m512i w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab[b]);
          for (int i = 0; i < RN; ++i)
            ai[b][i] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(ai[b][i], w0, x0[i]), w1, x1[i]);
        }
      }
      for (int b = 0; b < RB; ++b)
        for (int i = 0; i < RN; ++i)
          acc[b][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[b][i]), _mm512_set1_ps(cs[b] * xscale[i * B + k0 / block]),
                                      acc[b][i]);
    }
  }
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < RN; ++i) out[b * RN + i] = _mm512_reduce_add_ps(acc[b][i]);
}

#define CBTILE(RB, RN) codebook4_tile<RB, RN>(rows, cent, a.G, a.group, a.block, xq, a.K, xsc, out)

// Groups of a multiple of 64 take the integer tiles above; others the AVX2 path (x comes quantized in its order).
void codebook4_block(const Codebook4Args& a, int64_t e, int64_t n0, int64_t n1, int64_t lo, int64_t hi) {
  if (a.xq == nullptr || a.group % 64 != 0) return avx2::codebook4_block(a, e, n0, n1, lo, hi);
  const uint8_t* rows[4];
  const at::Half* cent[4];
  float out[8];
  for_each_tile(e, a.N, a.E, a.W, a.packed, n0, n1, lo, hi, 4, kRbFor, [&](int64_t n, int rb, int64_t r0, int rn) {
    for (int b = 0; b < rb; ++b) {
      const int64_t row_id = e * a.N + n + b;
      rows[b] = reinterpret_cast<const uint8_t*>(a.packed + row_id * a.W);
      cent[b] = a.cent + row_id * a.G * 16;
    }
    const int16_t* xq = a.xq + r0 * a.K;
    const float* xsc = a.xscale + r0 * (a.K / a.block);
    switch (rb * 10 + rn) {
      case 41: CBTILE(4, 1); break; case 31: CBTILE(3, 1); break; case 21: CBTILE(2, 1); break;
      case 11: CBTILE(1, 1); break; case 42: CBTILE(4, 2); break; case 32: CBTILE(3, 2); break;
      case 22: CBTILE(2, 2); break; case 12: CBTILE(1, 2); break; case 23: CBTILE(2, 3); break;
      case 13: CBTILE(1, 3); break; case 24: CBTILE(2, 4); break; default: CBTILE(1, 4); break;
    }
    for (int b = 0; b < rb; ++b)
      for (int i = 0; i < rn; ++i) a.y[(r0 + i) * a.N + n + b] = out[b * rn + i];
  });
}
#undef CBTILE

}  // namespace avx512
#pragma GCC pop_options
#endif  // SPECMOE_X86

Affine3Block affine3_impl() {
#if SPECMOE_X86
  switch (active_isa()) {
    case kAvx512: return avx512::affine3_block;
    case kAvx2: return avx2::affine3_block;
  }
#endif
  return scalar::affine3_block;
}

Codebook4Block codebook4_impl() {
#if SPECMOE_X86
  switch (active_isa()) {
    case kAvx512: return avx512::codebook4_block;
    case kAvx2: return avx2::codebook4_block;
  }
#endif
  return scalar::codebook4_block;
}

float dot_any(const float* a, const float* b, int64_t n) {
#if SPECMOE_X86
  if (active_isa() >= kAvx2) return avx2::dot(a, b, n);
#endif
  return scalar::dot(a, b, n);
}

// Calls fn(e, n0, n1, lo, hi) for every block of kBlockN output rows of every expert e that has rows lo..hi,
// split over torch's threads (one task when the work is small).
template <typename F>
void for_each_block(int64_t E, int64_t N, int64_t K, int64_t R, const int64_t* off, const F& fn) {
  const int64_t nblocks = (N + kBlockN - 1) / kBlockN;
  at::parallel_for(0, E * nblocks, grain(N, K, (R + E - 1) / E), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e = b / nblocks, n0 = (b % nblocks) * kBlockN, n1 = std::min(N, n0 + kBlockN);
      if (off[e + 1] > off[e]) fn(e, n0, n1, off[e], off[e + 1]);
    }
  });
}

// x [R, K] as int16 [R, Kp] per block of `block` values (zero past K): q = round(x / s), s = max|x| / limit (so
// |x - s q| <= s / 2); `scale` [R, Kp / block] gets s (NaN for a block with NaN or inf, so the output is NaN as on
// the float paths) and `sums` (if given) s * sum(q), the dequantized block sum.
// `order` is the order the codebook paths look codes up in: AVX2's within each 32 values (see avx2::table16), or
// AVX-512's even then odd positions of each 64 (avx512::codebook4_tile).
enum class XOrder { kNatural, kAvx2Codebook, kEvenOdd64 };

inline int64_t x_position(int64_t k, XOrder order) {
  switch (order) {
    case XOrder::kAvx2Codebook: {
      const int64_t j = k % 32, half = j / 16, jj = j % 16;
      return k - j + 16 * half + (jj % 2) * 8 + jj / 2;
    }
    case XOrder::kEvenOdd64: {
      const int64_t j = k % 64;
      return k - j + (j % 2) * 32 + j / 2;
    }
    default: return k;
  }
}

void quantize_x16(const float* x, int64_t R, int64_t K, int64_t Kp, int64_t block, float limit, XOrder order,
                  int16_t* q, float* scale, float* sums) {
  const int64_t B = Kp / block;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + r * K;
      const int64_t lo = b * block, hi = std::min(K, lo + block);
      float m = 0.f;
      bool finite = true;
      for (int64_t k = lo; k < hi; ++k) {
        m = std::max(m, std::fabs(xb[k]));
        finite = finite && std::isfinite(xb[k]);
      }
      const float inv = m > 0.f && finite ? limit / m : 0.f;
      int32_t total = 0;
      for (int64_t k = lo; k < lo + block; ++k) {
        const int32_t v = k < hi ? (int32_t)std::nearbyint(xb[k] * inv) : 0;
        q[r * Kp + x_position(k, order)] = (int16_t)v;
        total += v;
      }
      scale[r * B + b] = !finite ? NAN : inv > 0.f ? m / limit : 0.f;  // NaN or inf in x: NaN out, as in float
      if (sums) sums[r * B + b] = scale[r * B + b] * (float)total;
    }
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

  // The scalar path: x zero-padded to Kp and its group sums. The integer paths (AVX2, AVX-512): x as int16 per
  // group, xsum the dequantized x's group sums. Both: the compensator's V x.
  std::vector<float> xpad, xsum(R * G, 0.f), t(R * (rank > 0 ? rank : 1), 0.f), xscale;
  std::vector<int16_t> xq;
  if (active_isa() >= kAvx2) {
    xq.resize(R * Kp);
    xscale.resize(R * G);
    quantize_x16(xp, R, K, Kp, group, 32767.f, XOrder::kNatural, xq.data(), xscale.data(), xsum.data());
  } else {
    xpad.assign(R * Kp, 0.f);
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(&xpad[r * Kp], xp + r * K, K * sizeof(float));
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = 0; k < group; ++k) s += xpad[r * Kp + g * group + k];
        xsum[r * G + g] = s;
      }
    }
  }
  if (comp) {
    const float* vp = v.data_ptr<float>();
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = off[e]; r < off[e + 1]; ++r)
        for (int64_t j = 0; j < rank; ++j) t[r * rank + j] = dot_any(vp + (e * rank + j) * K, xp + r * K, K);
  }
  const Affine3Args args{xpad.empty() ? nullptr : xpad.data(), xsum.data(), xq.empty() ? nullptr : xq.data(),
                         xscale.empty() ? nullptr : xscale.data(), t.data(), comp ? u.data_ptr<float>() : nullptr,
                         reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()), scale.data_ptr<at::Half>(),
                         zero.data_ptr<at::Half>(), y.data_ptr<float>(), E, N, W, G, group, Kp, rank};
  const Affine3Block block = affine3_impl();
  for_each_block(E, N, K, R, off, [&](int64_t e, int64_t n0, int64_t n1, int64_t lo, int64_t hi) {
    block(args, e, n0, n1, lo, hi);
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
  auto y = torch::empty({R, N}, x.options());  // every row belongs to one expert
  if (R == 0 || N == 0) return y;
  const int64_t group = K / G;
  const int64_t xblock = group % 128 == 0 ? 128 : (group % 64 == 0 ? 64 : 32);  // x's quantization blocks
  std::vector<int16_t> xq;
  std::vector<float> xscale;
  const float* xp = x.data_ptr<float>();
  if (active_isa() >= kAvx2 && group % 32 == 0) {  // the integer paths read x as int16 in their lookup order
    const XOrder order = active_isa() == kAvx512 && group % 64 == 0 ? XOrder::kEvenOdd64 : XOrder::kAvx2Codebook;
    xq.resize(R * K);
    xscale.resize(R * (K / xblock));
    quantize_x16(xp, R, K, K, xblock, 16383.f, order, xq.data(), xscale.data(), nullptr);
  }
  const Codebook4Args args{xp, xq.empty() ? nullptr : xq.data(), xscale.empty() ? nullptr : xscale.data(),
                           reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()),
                           centroids.data_ptr<at::Half>(), y.data_ptr<float>(), E, N, W, G, group, K, xblock};
  const Codebook4Block block = codebook4_impl();
  for_each_block(E, N, K, R, offsets.data_ptr<int64_t>(),
                 [&](int64_t e, int64_t n0, int64_t n1, int64_t lo, int64_t hi) { block(args, e, n0, n1, lo, hi); });
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
      scalar::unpack3(pw + n * W, Kp, q.data());
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / group;
        op[n * K + k] = (q[k] - half_to_float(zp[n * G + g])) * half_to_float(sp[n * G + g]);
      }
    }
  });
  return out;
}

// y[R, N] = x [R, K] @ w[N, K]^T (+ bias [N]), all float32: the decode-sized dense linear (a few rows of x).
torch::Tensor dense_rows(torch::Tensor x, torch::Tensor w, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [rows, K] tensor");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.size(1) == x.size(1),
              "w must be a contiguous float32 [N, K] tensor with x's K");
  const int64_t R = x.size(0), N = w.size(0), K = w.size(1);
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == N && bias.scalar_type() == torch::kFloat32 && bias.is_contiguous()),
              "bias must be empty or a contiguous float32 [N] tensor");
  auto y = torch::empty({R, N}, x.options());
  if (R == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool fast = active_isa() >= kAvx2;
  // a task reads at least ~256 KiB of weights: below that a second thread costs more than it saves
  const int64_t grain = std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(1, K));
  at::parallel_for(0, (N + 7) / 8, (grain + 7) / 8, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 8, n1 = std::min(N, b1 * 8);
#if SPECMOE_X86
    if (fast) return avx2::dense_block(xp, wp, yp, R, N, K, n0, n1);
#endif
    scalar::dense_block(xp, wp, yp, R, N, K, n0, n1);
  });
  if (bias.numel() > 0) y.add_(bias);
  return y;
}

namespace specmoe {
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_new, torch::Tensor v_new,
                               std::vector<torch::Tensor> kvs, std::vector<torch::Tensor> bases,
                               std::vector<int64_t> offsets, int64_t layer, std::vector<int64_t> past,
                               std::vector<int64_t> lens, double scale, bool fast);  // attention_cpu.cpp
}  // namespace specmoe

// The native engine's attention for a step's few new tokens per sequence (attention_cpu.cpp), on the AVX2 path
// unless the scalar one is forced or the CPU lacks AVX2 (AVX-512 machines take the AVX2 code).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_new, torch::Tensor v_new,
                               std::vector<torch::Tensor> kvs, std::vector<torch::Tensor> bases,
                               std::vector<int64_t> offsets, int64_t layer, std::vector<int64_t> past,
                               std::vector<int64_t> lens, double scale) {
  return specmoe::decode_attention(q, k_new, v_new, std::move(kvs), std::move(bases), std::move(offsets), layer,
                                   std::move(past), std::move(lens), scale, active_isa() >= kAvx2);
}

std::string isa() { return kIsaNames[active_isa()]; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= best_isa(); ++i) out.push_back(kIsaNames[i]);
  return out;
}

// Forces a code path ("native": the best this CPU has); refuses one the CPU lacks.
void set_isa(const std::string& name) {
  if (name == "native") {
    g_isa.store(best_isa());
    return;
  }
  for (int i = 0; i <= kAvx512; ++i)
    if (name == kIsaNames[i]) {
      TORCH_CHECK(i <= best_isa(), "this CPU has no ", name, " (it supports up to ", kIsaNames[best_isa()], ")");
      g_isa.store(i);
      return;
    }
  TORCH_CHECK(false, "unknown ISA '", name, "': use native, avx512, avx2 or scalar");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affine3_grouped", &affine3_grouped, "grouped 3-bit affine matmul (CPU)");
  m.def("codebook4_grouped", &codebook4_grouped, "grouped 4-bit codebook matmul (CPU)");
  m.def("affine3_dequant", &affine3_dequant, "3-bit affine dequantization (CPU)");
  m.def("dense_rows", &dense_rows, "float32 x [rows, K] @ w [N, K]^T for a few rows (CPU)");
  m.def("decode_attention", &decode_attention, "a step's attention over every sequence's own KV buffer (CPU)");
  m.def("isa", &isa, "the code path the kernels run (avx512, avx2 or scalar)");
  m.def("supported_isas", &supported_isas, "the code paths this CPU can run, scalar first");
  m.def("set_isa", &set_isa, "force a code path: native, avx512, avx2 or scalar");
}

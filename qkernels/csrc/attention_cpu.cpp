// Decode attention for the native engine (actors/runner.py): every sequence of a step in one call.
//
// A step feeds each sequence b a few new tokens (t_b: 1 in a decode step, k+1 in a speculative verification, a
// branch's short suffix at prefill). Their keys and values are written into the sequence's own KV buffer
// kv_b [L, 2, Hkv, capacity, D] at positions past_b .. past_b + t_b - 1, and new token i of sequence b attends,
// causally, to positions 0 .. past_b + i of that buffer. Query head h reads KV head h / (Hq / Hkv) (GQA).
//
// A sequence may share a cached prefix instead of holding a copy: its positions below offset_b are read from the
// prefix's buffer base_b (same layout), the rest from its own buffer, where position p sits at p - offset_b.
//
// Why not torch's SDPA: one call per sequence per layer costs about 75-95 us on a 2-core CPU for a single query
// over ~400 keys, most of it fixed cost, so a step of 4 sequences paid 4x a step of one; a padded batch needs a
// copy of every cache. Here one call covers the batch, reads each buffer in place, and the tasks (KV head,
// sequence, slice of keys; head-major, so sequences sharing a prefix read it back to back) are split over torch's
// threads; the slices of one head are merged by their softmax statistics (flash-decoding). Each task runs the
// online softmax over chunks of keys that stay in L1: for a chunk, the scores of every query of the head group
// (G = Hq / Hkv heads x t_b tokens share each key row), then p = exp(score - running max) and acc += p v.
//
// A task with many queries (kBlockedQueries or more: a drafted step, a short prompt) runs run_blocked instead: the
// chunk's keys transposed once, scores and outputs from register tiles of several queries, so that each load feeds
// several FMAs (docs/results/engine.md has the timings against SDPA up to 128 new tokens).
//
// Paths: AVX2 + FMA (D a multiple of 8; exp by Cephes' single-precision polynomial), and scalar loops (std::exp)
// for other CPUs and head sizes. Both are float32 throughout; tests/test_cpu_kernels.py checks them against SDPA.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define SPECMOE_ATTN_X86 1
#include <immintrin.h>
#else
#define SPECMOE_ATTN_X86 0
#endif

namespace specmoe {
namespace {

constexpr int64_t kChunk = 64;         // keys per online-softmax chunk (64 rows of D floats stay in L1)
constexpr int64_t kMinSliceKeys = 128;  // a head is split into slices of at least this many keys
constexpr int64_t kBlockedQueries = 8;  // queries per task from which the AVX2 path runs run_blocked

// One task: the queries of one (sequence, KV head) against a slice of that head's keys. Query q may see keys
// below limit[q]. Keeps, per query, the running max m, the sum of exp l and the unnormalized output acc [D]. The
// slice is run as segments (`run`: keys [j0, j1), key j's row at K + (j - first) * D), since a sequence that shares
// a cached prefix reads the prefix's keys from the prefix's buffer and the rest from its own.
struct Task {
  const float* const* q;  // nq query rows of D floats
  const int64_t* limit;   // nq: keys 0..limit[q]-1 are visible to query q
  int64_t nq;
  int64_t D;
  float scale;
  float* m;
  float* l;
  float* acc;  // nq * D

  void start() const {
    for (int64_t i = 0; i < nq; ++i) {
      m[i] = -std::numeric_limits<float>::infinity();
      l[i] = 0.f;
      std::fill(acc + i * D, acc + (i + 1) * D, 0.f);
    }
  }
};

namespace scalar {

void run(const Task& t, const float* Kb, const float* Vb, int64_t first, int64_t j0, int64_t j1) {
  std::vector<float> s(kChunk);
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    for (int64_t q = 0; q < t.nq; ++q) {
      const int64_t c1 = std::min({c0 + kChunk, j1, t.limit[q]});
      if (c1 <= c0) continue;
      const float* qr = t.q[q];
      float cmax = -std::numeric_limits<float>::infinity();
      for (int64_t j = c0; j < c1; ++j) {
        const float* kr = Kb + (j - first) * t.D;
        float d = 0.f;
        for (int64_t e = 0; e < t.D; ++e) d += qr[e] * kr[e];
        s[j - c0] = d * t.scale;
        cmax = std::max(cmax, s[j - c0]);
      }
      const float m = std::max(t.m[q], cmax);
      const float corr = std::exp(t.m[q] - m);  // 0 on the first chunk (exp(-inf))
      float* acc = t.acc + q * t.D;
      float l = t.l[q] * corr;
      for (int64_t e = 0; e < t.D; ++e) acc[e] *= corr;
      for (int64_t j = c0; j < c1; ++j) {
        const float p = std::exp(s[j - c0] - m);
        l += p;
        const float* vr = Vb + (j - first) * t.D;
        for (int64_t e = 0; e < t.D; ++e) acc[e] += p * vr[e];
      }
      t.m[q] = m;
      t.l[q] = l;
    }
  }
}

}  // namespace scalar

#if SPECMOE_ATTN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

// exp(x) for 8 floats: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial (Cephes' expf), times 2^n.
// x below -87.3 gives 0, NaN stays NaN.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-87.3365447504f), x);  // NaN: max_ps returns its second operand, x
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n through the exponent bits; n = -127 (x near the lower clamp) gives +0
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The sums of 4 vectors, as one 128-bit vector [a, b, c, d].
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

void run(const Task& t, const float* Kb, const float* Vb, int64_t first, int64_t j0, int64_t j1) {
  const int64_t D = t.D;
  alignas(32) float s[kChunk + 8];
  const __m256 vscale = _mm256_set1_ps(t.scale);
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    for (int64_t q = 0; q < t.nq; ++q) {
      const int64_t c1 = std::min({c0 + kChunk, j1, t.limit[q]});
      if (c1 <= c0) continue;
      const int64_t n = c1 - c0;
      const float* qr = t.q[q];
      const float* K = Kb + (c0 - first) * D;
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {  // 4 keys at a time: 4 independent FMA chains
        const float* k0 = K + j * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t e = 0; e < D; e += 8) {
          const __m256 qv = _mm256_loadu_ps(qr + e);
          a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + e), a0);
          a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + D + e), a1);
          a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * D + e), a2);
          a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * D + e), a3);
        }
        _mm_storeu_ps(s + j, _mm_mul_ps(hsum4(a0, a1, a2, a3), _mm256_castps256_ps128(vscale)));
      }
      for (; j < n; ++j) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t e = 0; e < D; e += 8)
          a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + e), _mm256_loadu_ps(K + j * D + e), a);
        s[j] = hsum(a) * t.scale;
      }
      float cmax = t.m[q];
      for (int64_t i = 0; i < n; ++i) cmax = std::max(cmax, s[i]);  // NaN scores: exp gives NaN below
      const float m = cmax;
      const float corr = std::exp(t.m[q] - m);  // 0 on the first chunk
      const int64_t n8 = (n + 7) & ~int64_t(7);
      for (int64_t i = n; i < n8; ++i) s[i] = -std::numeric_limits<float>::infinity();  // exp8 gives 0
      __m256 lsum = _mm256_setzero_ps();
      const __m256 vm = _mm256_set1_ps(m);
      for (int64_t i = 0; i < n8; i += 8) {
        const __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(s + i), vm));
        _mm256_store_ps(s + i, p);
        lsum = _mm256_add_ps(lsum, p);
      }
      t.l[q] = t.l[q] * corr + hsum(lsum);
      t.m[q] = m;
      float* acc = t.acc + q * D;
      const float* V = Vb + (c0 - first) * D;
      const __m256 vc = _mm256_set1_ps(corr);
      for (int64_t e0 = 0; e0 < D; e0 += 64) {  // 64 output floats (8 registers) at a time
        const int64_t w = std::min<int64_t>(64, D - e0) / 8;
        __m256 o[8];
        for (int64_t u = 0; u < w; ++u) o[u] = _mm256_mul_ps(_mm256_loadu_ps(acc + e0 + 8 * u), vc);
        for (int64_t i = 0; i < n; ++i) {
          const __m256 p = _mm256_set1_ps(s[i]);
          const float* vr = V + i * D + e0;
          for (int64_t u = 0; u < w; ++u) o[u] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * u), o[u]);
        }
        for (int64_t u = 0; u < w; ++u) _mm256_storeu_ps(acc + e0 + 8 * u, o[u]);
      }
    }
  }
}

// The chunk's keys [n, D] (rows of D floats) as Kt [D, kChunk]: key j of dimension e at Kt[e * kChunk + j], keys
// n..n8-1 zero. 8 x 8 blocks through registers.
inline void transpose_keys(const float* K, int64_t n, int64_t D, float* Kt) {
  for (int64_t j = 0; j < n; j += 8) {
    const int64_t rows = std::min<int64_t>(8, n - j);
    for (int64_t e = 0; e < D; e += 8) {
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) r[i] = i < rows ? _mm256_loadu_ps(K + (j + i) * D + e) : _mm256_setzero_ps();
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* o = Kt + e * kChunk + j;
      _mm256_storeu_ps(o + 0 * kChunk, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(o + 1 * kChunk, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(o + 2 * kChunk, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(o + 3 * kChunk, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(o + 4 * kChunk, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(o + 5 * kChunk, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(o + 6 * kChunk, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(o + 7 * kChunk, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
}

// Scores of NQ queries against NV x 8 keys from key jv of the transposed chunk: s[qi * kChunk + jv ..] = q . k *
// scale. Each dimension is one broadcast per query and one load per 8 keys, with no horizontal sums.
template <int NQ, int NV>
inline void score_tile(const float* const* q, const float* Kt, int64_t D, int64_t jv, __m256 scale, float* s) {
  __m256 a[NQ][NV];
  for (int qi = 0; qi < NQ; ++qi)
    for (int v = 0; v < NV; ++v) a[qi][v] = _mm256_setzero_ps();
  for (int64_t e = 0; e < D; ++e) {
    __m256 k[NV];
    for (int v = 0; v < NV; ++v) k[v] = _mm256_loadu_ps(Kt + e * kChunk + jv + 8 * v);
    for (int qi = 0; qi < NQ; ++qi) {
      const __m256 b = _mm256_broadcast_ss(q[qi] + e);
      for (int v = 0; v < NV; ++v) a[qi][v] = _mm256_fmadd_ps(b, k[v], a[qi][v]);
    }
  }
  for (int qi = 0; qi < NQ; ++qi)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(s + qi * kChunk + jv + 8 * v, _mm256_mul_ps(a[qi][v], scale));
}

template <int NQ>
inline void score_rows(const float* const* q, const float* Kt, int64_t D, int64_t n8, __m256 scale, float* s) {
  int64_t jv = 0;
  for (; jv + 16 <= n8; jv += 16) score_tile<NQ, 2>(q, Kt, D, jv, scale, s);
  if (jv < n8) score_tile<NQ, 1>(q, Kt, D, jv, scale, s);
}

// acc[qi] = acc[qi] * corr[qi] + sum over keys i < n of p[qi][i] v_i, dimensions e0 .. e0 + 8W.
template <int NQ, int W>
inline void value_tile(const float* const* p, const float* V, int64_t D, int64_t e0, int64_t n, const float* corr,
                       float* const* acc) {
  __m256 o[NQ][W];
  for (int qi = 0; qi < NQ; ++qi) {
    const __m256 c = _mm256_set1_ps(corr[qi]);
    for (int u = 0; u < W; ++u) o[qi][u] = _mm256_mul_ps(_mm256_loadu_ps(acc[qi] + e0 + 8 * u), c);
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* vr = V + i * D + e0;
    __m256 pb[NQ];
    for (int qi = 0; qi < NQ; ++qi) pb[qi] = _mm256_broadcast_ss(p[qi] + i);
    for (int u = 0; u < W; ++u) {
      const __m256 v = _mm256_loadu_ps(vr + 8 * u);
      for (int qi = 0; qi < NQ; ++qi) o[qi][u] = _mm256_fmadd_ps(pb[qi], v, o[qi][u]);
    }
  }
  for (int qi = 0; qi < NQ; ++qi)
    for (int u = 0; u < W; ++u) _mm256_storeu_ps(acc[qi] + e0 + 8 * u, o[qi][u]);
}

template <int NQ>
inline void value_rows(const float* const* p, const float* V, int64_t D, int64_t n, const float* corr,
                       float* const* acc) {
  for (int64_t e0 = 0; e0 < D; e0 += 32) {
    switch (std::min<int64_t>(32, D - e0) / 8) {
      case 4: value_tile<NQ, 4>(p, V, D, e0, n, corr, acc); break;
      case 3: value_tile<NQ, 3>(p, V, D, e0, n, corr, acc); break;
      case 2: value_tile<NQ, 2>(p, V, D, e0, n, corr, acc); break;
      default: value_tile<NQ, 1>(p, V, D, e0, n, corr, acc); break;
    }
  }
}

// The same as run for many queries (a drafted step, a branch's suffix: kBlockedQueries or more per task): the
// chunk's keys are transposed once, then every score comes out of a register tile of 4 queries x 16 keys and every
// output of one of 2 queries x 32 dimensions, so each load feeds several FMAs (run reloads the keys and values
// per query and sums each score horizontally).
void run_blocked(const Task& t, const float* Kb, const float* Vb, int64_t first, int64_t j0, int64_t j1) {
  const int64_t D = t.D;
  constexpr int64_t kRows = 16;  // queries per pass over a chunk: their scores stay in L1 beside the chunk
  std::vector<float> Kt(D * kChunk), s(kRows * kChunk);
  const __m256 vscale = _mm256_set1_ps(t.scale);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0), n8 = (n + 7) & ~int64_t(7);
    const float* V = Vb + (c0 - first) * D;
    transpose_keys(Kb + (c0 - first) * D, n, D, Kt.data());
    for (int64_t r0 = 0; r0 < t.nq; r0 += kRows) {
      const int64_t rows = std::min(kRows, t.nq - r0);
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) score_rows<4>(t.q + r0 + r, Kt.data(), D, n8, vscale, s.data() + r * kChunk);
      switch (rows - r) {
        case 3: score_rows<3>(t.q + r0 + r, Kt.data(), D, n8, vscale, s.data() + r * kChunk); break;
        case 2: score_rows<2>(t.q + r0 + r, Kt.data(), D, n8, vscale, s.data() + r * kChunk); break;
        case 1: score_rows<1>(t.q + r0 + r, Kt.data(), D, n8, vscale, s.data() + r * kChunk); break;
        default: break;
      }
      // per query: mask keys it may not see, then the online softmax's update; seen[] keys past which p is 0
      float corr[kRows];
      int64_t seen[kRows];
      const float* prow[kRows];
      float* arow[kRows];
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t qi = r0 + i;
        float* si = s.data() + i * kChunk;
        seen[i] = std::clamp<int64_t>(t.limit[qi] - c0, 0, n);
        prow[i] = si;
        arow[i] = t.acc + qi * D;
        if (seen[i] == 0) {  // this chunk is in the query's future: nothing changes
          std::fill(si, si + n8, 0.f);
          corr[i] = 1.f;
          continue;
        }
        for (int64_t j = seen[i]; j < n8; ++j) si[j] = ninf;
        __m256 mx = _mm256_set1_ps(t.m[qi]);
        for (int64_t j = 0; j < n8; j += 8) mx = _mm256_max_ps(_mm256_loadu_ps(si + j), mx);
        float lanes[8];
        _mm256_storeu_ps(lanes, mx);
        float m = t.m[qi];
        for (float x : lanes) m = std::max(m, x);  // NaN scores: exp gives NaN below
        const __m256 vm = _mm256_set1_ps(m);
        __m256 lsum = _mm256_setzero_ps();
        for (int64_t j = 0; j < n8; j += 8) {
          const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(si + j), vm));
          _mm256_storeu_ps(si + j, p);
          lsum = _mm256_add_ps(lsum, p);
        }
        corr[i] = std::exp(t.m[qi] - m);  // 0 on the query's first chunk
        t.l[qi] = t.l[qi] * corr[i] + hsum(lsum);
        t.m[qi] = m;
      }
      int64_t i = 0;
      for (; i + 2 <= rows; i += 2)
        value_rows<2>(prow + i, V, D, std::max(seen[i], seen[i + 1]), corr + i, arow + i);
      if (i < rows) value_rows<1>(prow + i, V, D, seen[i], corr + i, arow + i);
    }
  }
}

}  // namespace avx2
#pragma GCC pop_options
#endif

}  // namespace

// q [B, T, Hq, D], k_new / v_new [B, T, Hkv, D] (float32, contiguous); kvs: B buffers [L, 2, Hkv, capacity, D]
// (float32, contiguous), `layer` the one to use. Sequence b's position p lives in kvs[b] at p - offsets[b]; positions
// below offsets[b] are a shared prefix, read from bases[b] (same layout; an empty tensor when offsets[b] is 0).
// past[b]: positions already written; lens[b] = t_b <= T new tokens (rows t_b.. of q are padding). Writes the new
// keys and values into kvs[b] and returns [B, T, Hq * D] (padding rows zero). `fast`: the AVX2 path (the caller
// checks the CPU).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_new, torch::Tensor v_new,
                               std::vector<torch::Tensor> kvs, std::vector<torch::Tensor> bases,
                               std::vector<int64_t> offsets, int64_t layer, std::vector<int64_t> past,
                               std::vector<int64_t> lens, double scale, bool fast) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(),
              "q must be a contiguous float32 [B, T, Hq, D] tensor");
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  TORCH_CHECK(k_new.dim() == 4 && k_new.size(0) == B && k_new.size(1) == T && k_new.size(3) == D &&
                  k_new.scalar_type() == torch::kFloat32 && k_new.is_contiguous() && v_new.sizes() == k_new.sizes() &&
                  v_new.scalar_type() == torch::kFloat32 && v_new.is_contiguous(),
              "k_new and v_new must be contiguous float32 [B, T, Hkv, D] tensors matching q");
  const int64_t Hkv = k_new.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads (", Hq, ") must be a multiple of KV heads (", Hkv, ")");
  TORCH_CHECK(int64_t(kvs.size()) == B && int64_t(bases.size()) == B && int64_t(offsets.size()) == B &&
                  int64_t(past.size()) == B && int64_t(lens.size()) == B,
              "kvs, bases, offsets, past and lens need one entry per sequence");
  const int64_t G = Hq / Hkv;
  auto layer_of = [&](const torch::Tensor& kv, const char* what, int64_t b) {
    TORCH_CHECK(kv.dim() == 5 && kv.size(1) == 2 && kv.size(2) == Hkv && kv.size(4) == D &&
                    kv.scalar_type() == torch::kFloat32 && kv.is_contiguous() && layer >= 0 && layer < kv.size(0),
                what, " ", b, " must be a contiguous float32 [L, 2, Hkv, capacity, D] tensor with layer ", layer);
    return kv.data_ptr<float>() + layer * 2 * Hkv * kv.size(3) * D;
  };
  std::vector<float*> bufs(B);
  std::vector<const float*> base_bufs(B, nullptr);
  std::vector<int64_t> caps(B), base_caps(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    bufs[b] = layer_of(kvs[b], "kv buffer", b);
    caps[b] = kvs[b].size(3);
    TORCH_CHECK(offsets[b] >= 0 && lens[b] >= 1 && lens[b] <= T && past[b] >= offsets[b] &&
                    past[b] + lens[b] - offsets[b] <= caps[b],
                "sequence ", b, ": ", past[b], " cached + ", lens[b], " new tokens do not fit its buffer of ",
                caps[b], " from position ", offsets[b], " (or t_b is not in 1..T)");
    if (offsets[b] > 0) {
      base_bufs[b] = layer_of(bases[b], "prefix buffer", b);
      base_caps[b] = bases[b].size(3);
      TORCH_CHECK(base_caps[b] >= offsets[b], "sequence ", b, ": its prefix buffer holds ", base_caps[b],
                  " positions, not the ", offsets[b], " it shares");
    }
  }
  const float* qp = q.data_ptr<float>();
  const float* kn = k_new.data_ptr<float>();
  const float* vn = v_new.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)  // the new keys and values into their slots (before any task reads them)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t i = 0; i < lens[b]; ++i) {
        const int64_t src = ((b * T + i) * Hkv + h) * D, dst = (h * caps[b] + past[b] - offsets[b] + i) * D;
        std::memcpy(bufs[b] + dst, kn + src, D * sizeof(float));
        std::memcpy(bufs[b] + Hkv * caps[b] * D + dst, vn + src, D * sizeof(float));
      }

  // tasks: (KV head, sequence, slice of keys), head-major so that sequences sharing a prefix read it back to back
  // (from cache); a head is sliced when there are fewer (head, sequence) pairs than 2 per thread
  const int64_t threads = at::get_num_threads();
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) max_keys = std::max(max_keys, past[b] + lens[b]);
  int64_t S = std::max<int64_t>(1, (2 * threads + B * Hkv - 1) / (B * Hkv));
  S = std::max<int64_t>(1, std::min(S, max_keys / kMinSliceKeys));
  const int64_t Q = G * T;  // query rows per (sequence, KV head), padding rows included (skipped)
  const int64_t ntask = B * Hkv * S;
  std::vector<float> m(ntask * Q), l(ntask * Q), acc(ntask * Q * D);
  at::parallel_for(0, ntask, 1, [&](int64_t t0, int64_t t1) {
    std::vector<const float*> qrows(Q);
    std::vector<int64_t> limit(Q);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t h = task / (B * S), b = task / S % B, s = task % S;
      const int64_t nkeys = past[b] + lens[b], per = (nkeys + S - 1) / S;
      int64_t nq = 0;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < lens[b]; ++i, ++nq) {
          qrows[nq] = qp + ((b * T + i) * Hq + h * G + g) * D;
          limit[nq] = past[b] + i + 1;
        }
      const Task args{qrows.data(), limit.data(), nq, D, static_cast<float>(scale),
                      m.data() + task * Q, l.data() + task * Q, acc.data() + task * Q * D};
      args.start();
      const int64_t j0 = std::min(nkeys, s * per), j1 = std::min(nkeys, (s + 1) * per), off = offsets[b];
      const float* own = bufs[b] + h * caps[b] * D;
      const float* base = offsets[b] > 0 ? base_bufs[b] + h * base_caps[b] * D : nullptr;
      auto segment = [&](const float* K, int64_t kv_stride, int64_t first, int64_t a, int64_t z) {
        if (a >= z) return;
#if SPECMOE_ATTN_X86
        if (fast && D % 8 == 0) {
          if (nq >= kBlockedQueries) return avx2::run_blocked(args, K, K + kv_stride, first, a, z);
          return avx2::run(args, K, K + kv_stride, first, a, z);
        }
#endif
        scalar::run(args, K, K + kv_stride, first, a, z);
      };
      if (base != nullptr) segment(base, Hkv * base_caps[b] * D, 0, j0, std::min(j1, off));
      segment(own, Hkv * caps[b] * D, off, std::max(j0, off), j1);
    }
  });

  // merge the slices of each head: out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s
  auto out = torch::zeros({B, T, Hq * D}, q.options());
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      int64_t nq = 0;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < lens[b]; ++i, ++nq) {
          const int64_t base = (h * B + b) * S;
          float M = -std::numeric_limits<float>::infinity();
          for (int64_t s = 0; s < S; ++s) M = std::max(M, m[(base + s) * Q + nq]);
          float L = 0.f;
          float* o = op + ((b * T + i) * Hq + h * G + g) * D;
          for (int64_t s = 0; s < S; ++s) {
            const float ms = m[(base + s) * Q + nq];
            if (ms == -std::numeric_limits<float>::infinity()) continue;  // a slice this query sees nothing of
            const float w = std::exp(ms - M);
            L += w * l[(base + s) * Q + nq];
            const float* a = acc.data() + ((base + s) * Q + nq) * D;
            for (int64_t e = 0; e < D; ++e) o[e] += w * a[e];
          }
          const float inv = 1.f / L;
          for (int64_t e = 0; e < D; ++e) o[e] *= inv;
        }
    }
  return out;
}

}  // namespace specmoe

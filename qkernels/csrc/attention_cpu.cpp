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
        if (fast && D % 8 == 0) return avx2::run(args, K, K + kv_stride, first, a, z);
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

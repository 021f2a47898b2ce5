// pdserve's CPU decode path: paged attention that reads K/V blocks in place, fused small ops,
// and the whole Llama-family forward as one call (no per-op Python dispatch).
//
// Layouts (engine/attention/base.py):
//   kv_cache: (L, 2, N, bs, Hkv, D) float32, contiguous; one block of one layer's K or V is one
//             contiguous (bs, Hkv, D) range.
//   a flat ("varlen") batch: T new tokens of B sequences, concatenated sequence by sequence;
//   sequence b's queries sit at absolute positions ctx[b] - qlen[b] ... ctx[b] - 1 and attend
//   causally to every cached token of the sequence.
// Everything here is float32: on CPU that is the precision pdserve serves in.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::Tensor;

constexpr int kQueryRowsPerTile = 16;  // prefill rows that share one pass over K/V blocks
constexpr int kMaxHeadDim = 256;
constexpr int kMaxBlockSize = 64;

void check_f32_contig(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// exp for x <= 0 (softmax after max subtraction), vectorisable: Cody-Waite range reduction and a
// degree-6 polynomial, within 2 ulp of std::exp on [-87, 0]; below that it flushes to 0.
#pragma omp declare simd
inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Paged attention
// ---------------------------------------------------------------------------------------------

struct AttnShape {
  int64_t num_heads, num_kv_heads, head_dim, block_size;
  int64_t q_row_stride;    // floats between consecutive tokens' queries
  int64_t out_row_stride;  // floats between consecutive tokens' outputs
  int64_t table_stride;    // int32s between rows of block_tables
  float scale;
};

// One work item: query rows [r0, r1) (local to the sequence) of sequence b, one kv head.
// The query heads of the kv group and the tile's rows are scored against each K/V block once
// (flash-attention style online softmax), so a block is read once per tile, not once per head.
void attend_tile(const float* q, const float* k_cache, const float* v_cache, float* out,
                 const int32_t* table, int64_t q_start_token, int64_t first_pos, int64_t r0,
                 int64_t r1, int64_t kv_head, const AttnShape& s) {
  const int64_t D = s.head_dim, bs = s.block_size, Hkv = s.num_kv_heads;
  const int64_t g = s.num_heads / Hkv;
  const int64_t nq = (r1 - r0) * g;  // query vectors in the tile
  // Scratch, per thread: pre-scaled queries, accumulators, running max/sum, a transposed K block.
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(nq * D * 2 + nq * 2 + D * bs + bs * 2));
  float* qs = buf.data();
  float* acc = qs + nq * D;
  float* m = acc + nq * D;
  float* l = m + nq;
  float* kt = l + nq;  // (D, bs)
  float* sc = kt + D * bs;  // (bs,)
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < g; ++j) {
      const float* src = q + (q_start_token + r) * s.q_row_stride + (kv_head * g + j) * D;
      float* dst = qs + ((r - r0) * g + j) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * s.scale;
    }
  }
  std::fill(acc, acc + nq * D, 0.0f);
  std::fill(m, m + nq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + nq, 0.0f);

  const int64_t num_keys = first_pos + r1;  // the last row sees keys [0, first_pos + r1)
  const int64_t token_stride = Hkv * D;
  for (int64_t kb = 0; kb * bs < num_keys; ++kb) {
    const int64_t base = kb * bs;
    const int64_t cnt = std::min(bs, num_keys - base);
    const int64_t block_off = static_cast<int64_t>(table[kb]) * bs * token_stride + kv_head * D;
    const float* kblk = k_cache + block_off;
    const float* vblk = v_cache + block_off;
    for (int64_t t = 0; t < cnt; ++t) {
      const float* krow = kblk + t * token_stride;
      for (int64_t d = 0; d < D; ++d) kt[d * bs + t] = krow[d];
    }
    for (int64_t t = cnt; t < bs; ++t)
      for (int64_t d = 0; d < D; ++d) kt[d * bs + t] = 0.0f;
    for (int64_t qv = 0; qv < nq; ++qv) {
      const int64_t pos = first_pos + r0 + qv / g;  // this query's absolute position
      const int64_t valid = std::min(cnt, pos - base + 1);
      if (valid <= 0) continue;  // the whole block lies in this row's future
      const float* qrow = qs + qv * D;
#pragma omp simd
      for (int64_t t = 0; t < bs; ++t) sc[t] = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float qd = qrow[d];
        const float* ktd = kt + d * bs;
#pragma omp simd
        for (int64_t t = 0; t < bs; ++t) sc[t] += qd * ktd[t];
      }
      float mx = m[qv];
      for (int64_t t = 0; t < valid; ++t) mx = std::max(mx, sc[t]);
      const float alpha = exp_nonpos(m[qv] - mx);  // exp(-inf) -> 0 via the clamp
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < bs; ++t) {
        const float p = t < valid ? exp_nonpos(sc[t] - mx) : 0.0f;
        sc[t] = p;
        sum += p;
      }
      l[qv] = l[qv] * alpha + sum;
      m[qv] = mx;
      float* a = acc + qv * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      for (int64_t t = 0; t < valid; ++t) {
        const float p = sc[t];
        const float* vrow = vblk + t * token_stride;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += p * vrow[d];
      }
    }
  }
  for (int64_t qv = 0; qv < nq; ++qv) {
    const int64_t r = r0 + qv / g, j = qv % g;
    float* dst = out + (q_start_token + r) * s.out_row_stride + (kv_head * g + j) * D;
    const float inv = 1.0f / l[qv];
    const float* a = acc + qv * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = a[d] * inv;
  }
}

#ifdef __AVX512F__
// exp of 16 lanes (the polynomial of exp_nonpos), for x in [-87, 88]; clamped outside.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}

// r[i] = sum of the 16 lanes of v[i]: a transpose-and-add tree (pairs within 128-bit lanes,
// then quads, then across lanes) instead of 16 separate horizontal reductions.
inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j) {
    const __m512d x = _mm512_castps_pd(a[2 * j]), y = _mm512_castps_pd(a[2 * j + 1]);
    b[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // Lane L of b[j] holds lane-L partial sums of v[4j .. 4j+3]; add the four lanes together.
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The vectorised tile for head_dim = 16 * DV and block sizes that are multiples of 16. Keys are
// taken 16 at a time: scores for 16 keys are one register per query vector, so the online
// softmax runs on whole registers; the query vector's output row lives in DV registers while V
// rows stream past. Few query vectors (decode: one row, g heads) score each key row with a dot
// product; many (a prefill tile) share a transposed copy of the 16 keys instead.
template <int DV>
// Keys [key_lo, key_hi) only (key_lo a multiple of 16). With `partial`, the unnormalised state
// (max, sum, accumulator: D + 2 floats per query vector) goes there for a later combine.
void attend_tile_avx512(const float* q, const float* k_cache, const float* v_cache, float* out,
                        const int32_t* table, int64_t q_start_token, int64_t first_pos,
                        int64_t r0, int64_t r1, int64_t kv_head, const AttnShape& s,
                        int64_t key_lo, int64_t key_hi, float* partial) {
  constexpr int64_t D = 16 * DV;
  const int64_t bs = s.block_size, Hkv = s.num_kv_heads;
  const int64_t g = s.num_heads / Hkv;
  const int64_t nq = (r1 - r0) * g;
  const bool transpose = nq > 8;
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(nq * D * 2 + nq * 2 + D * 16 + nq * 16));
  float* qs = buf.data();
  float* acc = qs + nq * D;
  float* m = acc + nq * D;
  float* l = m + nq;
  float* kt = l + nq;       // (D, 16) transposed keys
  float* sc = kt + D * 16;  // (nq, 16) scores, then probabilities
  const __m512 vscale = _mm512_set1_ps(s.scale);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < g; ++j) {
      const float* src = q + (q_start_token + r) * s.q_row_stride + (kv_head * g + j) * D;
      float* dst = qs + ((r - r0) * g + j) * D;
      for (int dv = 0; dv < DV; ++dv)
        _mm512_storeu_ps(dst + 16 * dv, _mm512_mul_ps(_mm512_loadu_ps(src + 16 * dv), vscale));
    }
  std::fill(acc, acc + nq * D, 0.0f);
  std::fill(m, m + nq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + nq, 0.0f);
  const int64_t num_keys = std::min(first_pos + r1, key_hi);
  const int64_t token_stride = Hkv * D;
  for (int64_t base = key_lo; base < num_keys; base += 16) {
    const int64_t cnt = std::min<int64_t>(16, num_keys - base);
    const int64_t block = table[base / bs];
    const int64_t off = (block * bs + base % bs) * token_stride + kv_head * D;
    const float* kblk = k_cache + off;  // 16 consecutive tokens of one block
    const float* vblk = v_cache + off;
    // 1. scores (nq, 16)
    if (transpose) {
      for (int64_t t = 0; t < cnt; ++t)
        for (int64_t d = 0; d < D; ++d) kt[d * 16 + t] = kblk[t * token_stride + d];
      for (int64_t t = cnt; t < 16; ++t)
        for (int64_t d = 0; d < D; ++d) kt[d * 16 + t] = 0.0f;
      int64_t qv = 0;
      for (; qv + 4 <= nq; qv += 4) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const float* q0 = qs + qv * D;
        for (int64_t d = 0; d < D; ++d) {
          const __m512 kv = _mm512_loadu_ps(kt + d * 16);
          a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), kv, a0);
          a1 = _mm512_fmadd_ps(_mm512_set1_ps(q0[D + d]), kv, a1);
          a2 = _mm512_fmadd_ps(_mm512_set1_ps(q0[2 * D + d]), kv, a2);
          a3 = _mm512_fmadd_ps(_mm512_set1_ps(q0[3 * D + d]), kv, a3);
        }
        _mm512_storeu_ps(sc + qv * 16, a0);
        _mm512_storeu_ps(sc + (qv + 1) * 16, a1);
        _mm512_storeu_ps(sc + (qv + 2) * 16, a2);
        _mm512_storeu_ps(sc + (qv + 3) * 16, a3);
      }
      for (; qv < nq; ++qv) {
        __m512 a0 = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; ++d)
          a0 = _mm512_fmadd_ps(_mm512_set1_ps(qs[qv * D + d]), _mm512_loadu_ps(kt + d * 16), a0);
        _mm512_storeu_ps(sc + qv * 16, a0);
      }
    } else {
      for (int64_t qv = 0; qv < nq; ++qv) {
        const float* qr = qs + qv * D;
        __m512 qreg[DV];
        for (int dv = 0; dv < DV; ++dv) qreg[dv] = _mm512_loadu_ps(qr + 16 * dv);
        __m512 part[16];
        for (int t = 0; t < 16; ++t) {
          if (t >= cnt) {
            part[t] = _mm512_setzero_ps();
            continue;
          }
          const float* kr = kblk + t * token_stride;
          __m512 a = _mm512_mul_ps(qreg[0], _mm512_loadu_ps(kr));
          for (int dv = 1; dv < DV; ++dv)
            a = _mm512_fmadd_ps(qreg[dv], _mm512_loadu_ps(kr + 16 * dv), a);
          part[t] = a;
        }
        _mm512_storeu_ps(sc + qv * 16, hsum16(part));
      }
    }
    // 2. online softmax and 3. P @ V, one query vector at a time
    for (int64_t qv = 0; qv < nq; ++qv) {
      const int64_t pos = first_pos + r0 + qv / g;
      const int64_t valid = std::min(cnt, pos - base + 1);
      if (valid <= 0) continue;
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
      const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      const __m512 sv = _mm512_mask_blend_ps(mask, neg_inf, _mm512_loadu_ps(sc + qv * 16));
      const float mx = std::max(m[qv], _mm512_reduce_max_ps(sv));
      const float alpha = exp_nonpos(m[qv] - mx);
      const __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mx))));
      l[qv] = l[qv] * alpha + _mm512_reduce_add_ps(p);
      m[qv] = mx;
      alignas(64) float pr[16];
      _mm512_store_ps(pr, p);
      float* a = acc + qv * D;
      __m512 av[DV];
      const __m512 va = _mm512_set1_ps(alpha);
      for (int dv = 0; dv < DV; ++dv) av[dv] = _mm512_mul_ps(_mm512_loadu_ps(a + 16 * dv), va);
      for (int64_t t = 0; t < valid; ++t) {
        const __m512 pt = _mm512_set1_ps(pr[t]);
        const float* vr = vblk + t * token_stride;
        for (int dv = 0; dv < DV; ++dv)
          av[dv] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + 16 * dv), av[dv]);
      }
      for (int dv = 0; dv < DV; ++dv) _mm512_storeu_ps(a + 16 * dv, av[dv]);
    }
  }
  if (partial != nullptr) {
    for (int64_t qv = 0; qv < nq; ++qv) {
      float* dst = partial + qv * (D + 2);
      dst[0] = m[qv];
      dst[1] = l[qv];
      std::memcpy(dst + 2, acc + qv * D, D * sizeof(float));
    }
    return;
  }
  for (int64_t qv = 0; qv < nq; ++qv) {
    const int64_t r = r0 + qv / g, j = qv % g;
    float* dst = out + (q_start_token + r) * s.out_row_stride + (kv_head * g + j) * D;
    const __m512 inv = _mm512_set1_ps(1.0f / l[qv]);
    for (int dv = 0; dv < DV; ++dv)
      _mm512_storeu_ps(dst + 16 * dv, _mm512_mul_ps(_mm512_loadu_ps(acc + qv * D + 16 * dv), inv));
  }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// exp of 8 lanes (the polynomial of exp_nonpos), for x in [-87, 88]; clamped outside.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

// Lane sums and maxima of 8-lane registers.
inline float hadd8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}

// r[i] = sum of the 8 lanes of v[i]: two rounds of pairwise adds, then the two 128-bit halves.
inline __m256 hsum8(const __m256* v) {
  const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// The AVX2 counterpart of attend_tile_avx512: head_dim = 8 * DV, keys 8 at a time (block sizes
// that are multiples of 8), the whole key range (no flash-decoding split).
template <int DV>
void attend_tile_avx2(const float* q, const float* k_cache, const float* v_cache, float* out,
                      const int32_t* table, int64_t q_start_token, int64_t first_pos, int64_t r0,
                      int64_t r1, int64_t kv_head, const AttnShape& s) {
  constexpr int64_t D = 8 * DV;
  const int64_t bs = s.block_size, Hkv = s.num_kv_heads;
  const int64_t g = s.num_heads / Hkv;
  const int64_t nq = (r1 - r0) * g;
  const bool transpose = nq > 8;
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(nq * D * 2 + nq * 2 + D * 8 + nq * 8));
  float* qs = buf.data();
  float* acc = qs + nq * D;
  float* m = acc + nq * D;
  float* l = m + nq;
  float* kt = l + nq;      // (D, 8) transposed keys
  float* sc = kt + D * 8;  // (nq, 8) scores
  const __m256 vscale = _mm256_set1_ps(s.scale);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < g; ++j) {
      const float* src = q + (q_start_token + r) * s.q_row_stride + (kv_head * g + j) * D;
      float* dst = qs + ((r - r0) * g + j) * D;
      for (int dv = 0; dv < DV; ++dv)
        _mm256_storeu_ps(dst + 8 * dv, _mm256_mul_ps(_mm256_loadu_ps(src + 8 * dv), vscale));
    }
  std::fill(acc, acc + nq * D, 0.0f);
  std::fill(m, m + nq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + nq, 0.0f);
  const int64_t num_keys = first_pos + r1;
  const int64_t token_stride = Hkv * D;
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t base = 0; base < num_keys; base += 8) {
    const int64_t cnt = std::min<int64_t>(8, num_keys - base);
    const int64_t block = table[base / bs];
    const int64_t off = (block * bs + base % bs) * token_stride + kv_head * D;
    const float* kblk = k_cache + off;  // 8 consecutive tokens of one block
    const float* vblk = v_cache + off;
    if (transpose) {
      for (int64_t t = 0; t < cnt; ++t)
        for (int64_t d = 0; d < D; ++d) kt[d * 8 + t] = kblk[t * token_stride + d];
      for (int64_t t = cnt; t < 8; ++t)
        for (int64_t d = 0; d < D; ++d) kt[d * 8 + t] = 0.0f;
      int64_t qv = 0;
      for (; qv + 4 <= nq; qv += 4) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const float* q0 = qs + qv * D;
        for (int64_t d = 0; d < D; ++d) {
          const __m256 kv = _mm256_loadu_ps(kt + d * 8);
          a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(q0 + d), kv, a0);
          a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(q0 + D + d), kv, a1);
          a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(q0 + 2 * D + d), kv, a2);
          a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(q0 + 3 * D + d), kv, a3);
        }
        _mm256_storeu_ps(sc + qv * 8, a0);
        _mm256_storeu_ps(sc + (qv + 1) * 8, a1);
        _mm256_storeu_ps(sc + (qv + 2) * 8, a2);
        _mm256_storeu_ps(sc + (qv + 3) * 8, a3);
      }
      for (; qv < nq; ++qv) {
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; ++d)
          a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(qs + qv * D + d), _mm256_loadu_ps(kt + d * 8),
                               a0);
        _mm256_storeu_ps(sc + qv * 8, a0);
      }
    } else {
      for (int64_t qv = 0; qv < nq; ++qv) {
        const float* qr = qs + qv * D;
        __m256 part[8];
        for (int t = 0; t < 8; ++t) {
          if (t >= cnt) {
            part[t] = _mm256_setzero_ps();
            continue;
          }
          const float* kr = kblk + t * token_stride;
          __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qr), _mm256_loadu_ps(kr));
          for (int dv = 1; dv < DV; ++dv)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + 8 * dv), _mm256_loadu_ps(kr + 8 * dv), a);
          part[t] = a;
        }
        _mm256_storeu_ps(sc + qv * 8, hsum8(part));
      }
    }
    for (int64_t qv = 0; qv < nq; ++qv) {
      const int64_t pos = first_pos + r0 + qv / g;
      const int64_t valid = std::min(cnt, pos - base + 1);
      if (valid <= 0) continue;
      const __m256 mask = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(valid)), _CMP_LT_OQ);
      const __m256 sv = _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(sc + qv * 8), mask);
      const float mx = std::max(m[qv], hmax8(sv));
      const float alpha = exp_nonpos(m[qv] - mx);
      const __m256 p = _mm256_and_ps(mask, exp256(_mm256_sub_ps(sv, _mm256_set1_ps(mx))));
      l[qv] = l[qv] * alpha + hadd8(p);
      m[qv] = mx;
      alignas(32) float pr[8];
      _mm256_store_ps(pr, p);
      float* a = acc + qv * D;
      __m256 av[DV];
      const __m256 va = _mm256_set1_ps(alpha);
      for (int dv = 0; dv < DV; ++dv) av[dv] = _mm256_mul_ps(_mm256_loadu_ps(a + 8 * dv), va);
      for (int64_t t = 0; t < valid; ++t) {
        const __m256 pt = _mm256_set1_ps(pr[t]);
        const float* vr = vblk + t * token_stride;
        for (int dv = 0; dv < DV; ++dv)
          av[dv] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + 8 * dv), av[dv]);
      }
      for (int dv = 0; dv < DV; ++dv) _mm256_storeu_ps(a + 8 * dv, av[dv]);
    }
  }
  for (int64_t qv = 0; qv < nq; ++qv) {
    const int64_t r = r0 + qv / g, j = qv % g;
    float* dst = out + (q_start_token + r) * s.out_row_stride + (kv_head * g + j) * D;
    const __m256 inv = _mm256_set1_ps(1.0f / l[qv]);
    for (int dv = 0; dv < DV; ++dv)
      _mm256_storeu_ps(dst + 8 * dv, _mm256_mul_ps(_mm256_loadu_ps(acc + qv * D + 8 * dv), inv));
  }
}
#endif

bool fast_tile_ok(const AttnShape& s) {
#ifdef __AVX512F__
  return s.block_size % 16 == 0 &&
         (s.head_dim == 16 || s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 128);
#else
  return false;
#endif
}

// The tile through the vectorised kernel where its shape allows (fast_tile_ok), else the
// portable one (whole key range, no partial output).
void attend_tile_any(const float* q, const float* k_cache, const float* v_cache, float* out,
                     const int32_t* table, int64_t q_start_token, int64_t first_pos, int64_t r0,
                     int64_t r1, int64_t kv_head, const AttnShape& s, int64_t key_lo = 0,
                     int64_t key_hi = std::numeric_limits<int64_t>::max(),
                     float* partial = nullptr) {
#ifdef __AVX512F__
  if (fast_tile_ok(s)) {
#define PDSERVE_TILE(DV)                                                                   \
  return attend_tile_avx512<DV>(q, k_cache, v_cache, out, table, q_start_token, first_pos, \
                                r0, r1, kv_head, s, key_lo, key_hi, partial)
    switch (s.head_dim) {
      case 16: PDSERVE_TILE(1);
      case 32: PDSERVE_TILE(2);
      case 64: PDSERVE_TILE(4);
      default: PDSERVE_TILE(8);
    }
#undef PDSERVE_TILE
  }
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  if (s.block_size % 8 == 0 && partial == nullptr) {
#define PDSERVE_TILE(DV)                                                                        \
  return attend_tile_avx2<DV>(q, k_cache, v_cache, out, table, q_start_token, first_pos, r0, r1, \
                              kv_head, s)
    switch (s.head_dim) {
      case 16: PDSERVE_TILE(2);
      case 32: PDSERVE_TILE(4);
      case 64: PDSERVE_TILE(8);
      case 128: PDSERVE_TILE(16);
      default: break;
    }
#undef PDSERVE_TILE
  }
#endif
  attend_tile(q, k_cache, v_cache, out, table, q_start_token, first_pos, r0, r1, kv_head, s);
}

struct WorkItem {
  int32_t seq, kv_head, r0, r1;
};

// Decode-only batches with fewer (sequence, kv head) items than a few per thread split each
// item's keys into chunks (flash-decoding) and combine the chunks' softmax states after.
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kMinKeysPerSplit = 128;

void combine_splits(const float* partial, float* out, int64_t nq, int64_t nsplit, int64_t D,
                    int64_t q_token, int64_t head0, int64_t out_row_stride) {
  for (int64_t qv = 0; qv < nq; ++qv) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t sp = 0; sp < nsplit; ++sp) mx = std::max(mx, partial[(sp * nq + qv) * (D + 2)]);
    float total = 0.0f;
    float* dst = out + q_token * out_row_stride + (head0 + qv) * D;
    std::fill(dst, dst + D, 0.0f);
    for (int64_t sp = 0; sp < nsplit; ++sp) {
      const float* p = partial + (sp * nq + qv) * (D + 2);
      if (p[1] == 0.0f) continue;  // a chunk with no keys
      const float w = exp_nonpos(p[0] - mx);
      total += p[1] * w;
      for (int64_t d = 0; d < D; ++d) dst[d] += p[2 + d] * w;
    }
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
  }
}

void paged_attention_raw(const float* q, const float* k_cache, const float* v_cache, float* out,
                         const int32_t* block_tables, const int32_t* context_lens,
                         const int32_t* cu_seqlens_q, int64_t num_seqs, const AttnShape& s) {
  std::vector<WorkItem> items;
  bool decode_only = true;
  int64_t max_ctx = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int32_t qlen = cu_seqlens_q[b + 1] - cu_seqlens_q[b];
    decode_only = decode_only && qlen == 1;
    max_ctx = std::max<int64_t>(max_ctx, context_lens[b]);
    for (int32_t r0 = 0; r0 < qlen; r0 += kQueryRowsPerTile)
      for (int32_t h = 0; h < s.num_kv_heads; ++h)
        items.push_back({static_cast<int32_t>(b), h, r0, std::min(qlen, r0 + kQueryRowsPerTile)});
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t want = kItemsPerThread * at::get_num_threads();
  int64_t nsplit = 1;
  if (decode_only && fast_tile_ok(s) && n_items < want)
    nsplit = std::min((want + n_items - 1) / n_items, std::max<int64_t>(1, max_ctx / kMinKeysPerSplit));
  if (nsplit == 1) {
    at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const WorkItem& w = items[i];
        const int32_t qlen = cu_seqlens_q[w.seq + 1] - cu_seqlens_q[w.seq];
        const int64_t first_pos = context_lens[w.seq] - qlen;
        attend_tile_any(q, k_cache, v_cache, out, block_tables + w.seq * s.table_stride,
                        cu_seqlens_q[w.seq], first_pos, w.r0, w.r1, w.kv_head, s);
      }
    });
    return;
  }
  const int64_t g = s.num_heads / s.num_kv_heads, D = s.head_dim;
  const int64_t item_floats = nsplit * g * (D + 2);
  std::vector<float> partial(static_cast<size_t>(n_items * item_floats));
  at::parallel_for(0, n_items * nsplit, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / nsplit, sp = task % nsplit;
      const WorkItem& w = items[i];
      const int64_t ctx = context_lens[w.seq];
      const int64_t chunk = ((ctx + nsplit - 1) / nsplit + 15) / 16 * 16;
      float* dst = partial.data() + i * item_floats + sp * g * (D + 2);
      attend_tile_any(q, k_cache, v_cache, out, block_tables + w.seq * s.table_stride,
                      cu_seqlens_q[w.seq], ctx - 1, 0, 1, w.kv_head, s, sp * chunk,
                      (sp + 1) * chunk, dst);
    }
  });
  for (int64_t i = 0; i < n_items; ++i) {
    const WorkItem& w = items[i];
    combine_splits(partial.data() + i * item_floats, out, g, nsplit, D, cu_seqlens_q[w.seq],
                   w.kv_head * g, s.out_row_stride);
  }
}

void check_attention_inputs(const Tensor& k_cache, const Tensor& v_cache,
                            const Tensor& block_tables, const Tensor& context_lens,
                            const Tensor& cu_seqlens_q, int64_t num_heads) {
  check_f32_contig(k_cache, "k_cache");
  check_f32_contig(v_cache, "v_cache");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache/v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim)");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.stride(1) == 1,
              "block_tables must be a row-major (B, max_blocks) int32 tensor");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.is_contiguous(),
              "context_lens must be contiguous int32");
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_q.is_contiguous(),
              "cu_seqlens_q must be contiguous int32");
  const int64_t B = context_lens.size(0);
  TORCH_CHECK(cu_seqlens_q.size(0) == B + 1 && block_tables.size(0) >= B,
              "cu_seqlens_q must have B + 1 entries and block_tables B rows");
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(bs <= kMaxBlockSize && D <= kMaxHeadDim, "block_size <= ", kMaxBlockSize,
              " and head_dim <= ", kMaxHeadDim, " are supported");
  TORCH_CHECK(num_heads % Hkv == 0, "num_heads must be a multiple of num_kv_heads");
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1), num_blocks = k_cache.size(0);
  for (int64_t b = 0; b < B; ++b) {
    const int32_t qlen = cu[b + 1] - cu[b];
    TORCH_CHECK(qlen >= 0 && ctx[b] >= qlen, "sequence ", b, ": context_len ", ctx[b],
                " < query_len ", qlen);
    TORCH_CHECK((ctx[b] + bs - 1) / bs <= max_blocks, "sequence ", b,
                ": block table too short for context ", ctx[b]);
    const int32_t* row = block_tables.data_ptr<int32_t>() + b * block_tables.stride(0);
    for (int64_t i = 0; i < (ctx[b] + bs - 1) / bs; ++i)
      TORCH_CHECK(row[i] >= 0 && row[i] < num_blocks, "sequence ", b, ": block id ", row[i],
                  " out of range [0, ", num_blocks, ")");
  }
}

AttnShape make_shape(int64_t num_heads, const Tensor& k_cache, const Tensor& block_tables,
                     int64_t q_row_stride, int64_t out_row_stride, double scale) {
  return AttnShape{num_heads,          k_cache.size(2),       k_cache.size(3),
                   k_cache.size(1),    q_row_stride,          out_row_stride,
                   block_tables.stride(0), static_cast<float>(scale)};
}

// ---------------------------------------------------------------------------------------------
// Matmuls: y (M, N) = x (M, K) @ W (N, K)^T + bias over pre-packed weights
// ---------------------------------------------------------------------------------------------
// A decode step multiplies a few rows by every weight (a stream over the weights, bound by
// memory bandwidth); a prefill chunk multiplies many (bound by FMA throughput). Measured here,
// torch's BLAS takes about twice as long as the packed kernel below on both (measured with
// `python -m pdserve.bench.decode_profile`, docs/benchmarks.md).

#ifdef __AVX512F__
constexpr bool kHaveAvx512 = true;

// Packed GEMM: y (M, N) = x (M, K) @ W^T + bias with W packed as panels of kPanel output
// columns, k-major: panel p holds W[p*kPanel + j][k] at [p][k][j] (zero-padded past N). Each
// k step loads one contiguous panel row (two vectors), broadcasts kMR inputs and does 2*kMR
// FMAs, so the same kernel streams weights at memory speed for one row and stays FMA-bound for
// many; the ~2 GFLOP matmuls of a prefill chunk go through it too.
constexpr int64_t kPanel = 32;
constexpr int64_t kMR = 8;          // input rows per micro-tile (16 accumulators)
constexpr int64_t kRowBlock = 64;   // input rows that share one pass over the panels

template <int MR>
inline void panel_tile(const float* x, const float* panel, const float* bias, float* y, int64_t K,
                       int64_t ldy, int64_t n0, int64_t ncols, int64_t m0) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const float* xr = x + m0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel);
    const __m512 w1 = _mm512_loadu_ps(panel + k * kPanel + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(xr[i * K + k]);
      acc[i][0] = _mm512_fmadd_ps(w0, xb, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(w1, xb, acc[i][1]);
    }
  }
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  const __mmask16 m_lo = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1u);
  const __mmask16 m_hi =
      ncols >= 32 ? 0xFFFF
                  : (ncols <= 16 ? 0 : static_cast<__mmask16>((1u << (ncols - 16)) - 1u));
  if (bias != nullptr) {
    b0 = _mm512_maskz_loadu_ps(m_lo, bias + n0);
    b1 = _mm512_maskz_loadu_ps(m_hi, bias + n0 + 16);
  }
  for (int i = 0; i < MR; ++i) {
    float* yr = y + (m0 + i) * ldy + n0;
    _mm512_mask_storeu_ps(yr, m_lo, _mm512_add_ps(acc[i][0], b0));
    _mm512_mask_storeu_ps(yr + 16, m_hi, _mm512_add_ps(acc[i][1], b1));
  }
}

void packed_matmul(const float* x, const float* packed, const float* bias, float* y, int64_t M,
                   int64_t N, int64_t K, int64_t ldy) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  // Panels vary fastest, so one thread's consecutive tasks reuse its block of input rows.
  at::parallel_for(0, panels * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task % panels, rb = task / panels;
      const float* panel = packed + p * K * kPanel;
      const int64_t n0 = p * kPanel, ncols = std::min(kPanel, N - n0);
      const int64_t lo = rb * kRowBlock, hi = std::min(M, lo + kRowBlock);
      int64_t m0 = lo;
      for (; m0 + kMR <= hi; m0 += kMR) panel_tile<kMR>(x, panel, bias, y, K, ldy, n0, ncols, m0);
      switch (hi - m0) {
        case 7: panel_tile<7>(x, panel, bias, y, K, ldy, n0, ncols, m0); break;
        case 6: panel_tile<6>(x, panel, bias, y, K, ldy, n0, ncols, m0); break;
        case 5: panel_tile<5>(x, panel, bias, y, K, ldy, n0, ncols, m0); break;
        case 4: panel_tile<4>(x, panel, bias, y, K, ldy, n0, ncols, m0); break;
        case 3: panel_tile<3>(x, panel, bias, y, K, ldy, n0, ncols, m0); break;
        case 2: panel_tile<2>(x, panel, bias, y, K, ldy, n0, ncols, m0); break;
        case 1: panel_tile<1>(x, panel, bias, y, K, ldy, n0, ncols, m0); break;
        default: break;
      }
    }
  });
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr bool kHaveAvx512 = false;

// The same packed panels through 8-lane AVX2 registers: a 32-column panel row is four vectors,
// so a micro-tile of kMR rows keeps 4 * kMR accumulators (16 registers in all: kMR = 3 leaves
// the weights to memory operands of the FMAs, which the load ports absorb).
constexpr int64_t kPanel = 32;
constexpr int64_t kMR = 3;
constexpr int64_t kRowBlock = 63;

template <int MR>
inline void panel_tile(const float* x, const float* panel, const float* bias, float* y, int64_t K,
                       int64_t ldy, int64_t n0, int64_t ncols, int64_t m0) {
  __m256 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* xr = x + m0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kPanel;
    for (int i = 0; i < MR; ++i) {
      const __m256 xb = _mm256_broadcast_ss(xr + i * K + k);
      for (int j = 0; j < 4; ++j)
        acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8 * j), xb, acc[i][j]);
    }
  }
  alignas(32) float b[kPanel] = {};
  if (bias != nullptr) std::memcpy(b, bias + n0, ncols * sizeof(float));
  for (int i = 0; i < MR; ++i) {
    float* yr = y + (m0 + i) * ldy + n0;
    if (ncols == kPanel) {
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_ps(yr + 8 * j, _mm256_add_ps(acc[i][j], _mm256_load_ps(b + 8 * j)));
    } else {
      alignas(32) float row[kPanel];
      for (int j = 0; j < 4; ++j)
        _mm256_store_ps(row + 8 * j, _mm256_add_ps(acc[i][j], _mm256_load_ps(b + 8 * j)));
      std::memcpy(yr, row, ncols * sizeof(float));
    }
  }
}

void packed_matmul(const float* x, const float* packed, const float* bias, float* y, int64_t M,
                   int64_t N, int64_t K, int64_t ldy) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, panels * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task % panels, rb = task / panels;
      const float* panel = packed + p * K * kPanel;
      const int64_t n0 = p * kPanel, ncols = std::min(kPanel, N - n0);
      const int64_t lo = rb * kRowBlock, hi = std::min(M, lo + kRowBlock);
      int64_t m0 = lo;
      for (; m0 + kMR <= hi; m0 += kMR) panel_tile<kMR>(x, panel, bias, y, K, ldy, n0, ncols, m0);
      switch (hi - m0) {
        case 2: panel_tile<2>(x, panel, bias, y, K, ldy, n0, ncols, m0); break;
        case 1: panel_tile<1>(x, panel, bias, y, K, ldy, n0, ncols, m0); break;
        default: break;
      }
    }
  });
}
#else
constexpr int64_t kPanel = 32;
void packed_matmul(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                   int64_t) {}
constexpr bool kHaveAvx512 = false;
#define PDSERVE_NO_PACKED_MATMUL
#endif

#ifdef PDSERVE_NO_PACKED_MATMUL
constexpr bool kHavePackedMatmul = false;
#else
constexpr bool kHavePackedMatmul = true;
#endif

// (N, K) weight -> (ceil(N / kPanel), K, kPanel) panels, zero-padded.
Tensor pack_weight(const Tensor& w) {
  check_f32_contig(w, "weight");
  TORCH_CHECK(w.dim() == 2, "weight must be (N, K)");
  const int64_t N = w.size(0), K = w.size(1), panels = (N + kPanel - 1) / kPanel;
  Tensor padded = at::zeros({panels * kPanel, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({panels, kPanel, K}).transpose(1, 2).contiguous();
}

// out = x @ w^T (+ bias) through packed panels (w_packed from pack_weight, n = w's rows).
void packed_linear_out(Tensor& out, const Tensor& x, const Tensor& w_packed, int64_t n,
                       const Tensor& bias) {
  const bool has_bias = bias.defined() && bias.numel() > 0;
  packed_matmul(x.data_ptr<float>(), w_packed.data_ptr<float>(),
                has_bias ? bias.data_ptr<float>() : nullptr, out.data_ptr<float>(), x.size(0), n,
                x.size(1), out.size(1));
}

// ---------------------------------------------------------------------------------------------
// Small fused ops (row-parallel)
// ---------------------------------------------------------------------------------------------

// out[t] = x[t] / rms(x[t]) * w, for rows of length n with the given row strides.
void rms_norm_rows(float* out, int64_t out_stride, const float* x, int64_t x_stride,
                   const float* w, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* xr = x + t * x_stride;
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
      float* o = out + t * out_stride;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = xr[i] * inv * w[i];
    }
  });
}

// residual += x; x = rms_norm(residual) * w   (both (rows, n) contiguous)
void add_rms_norm_rows(float* x, float* residual, const float* w, int64_t rows, int64_t n,
                       float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* xr = x + t * n;
      float* rr = residual + t * n;
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) {
        const float v = rr[i] + xr[i];
        rr[i] = v;
        ss += v * v;
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) xr[i] = rr[i] * inv * w[i];
    }
  });
}

// HF rotate_half RoPE in place on `heads` heads of head_dim D starting at x + t * row_stride.
void rope_rows(float* x, int64_t row_stride, int64_t heads, int64_t D, const int64_t* positions,
               const float* cos, const float* sin, int64_t rows) {
  const int64_t half = D / 2;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + positions[t] * half;
      const float* s = sin + positions[t] * half;
      for (int64_t h = 0; h < heads; ++h) {
        float* x1 = x + t * row_stride + h * D;
        float* x2 = x1 + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] - b * s[i];
          x2[i] = b * c[i] + a * s[i];
        }
      }
    }
  });
}

// out (rows, I) = silu(x[:, :I]) * x[:, I:]   with x (rows, 2I)
void silu_mul_rows(float* out, const float* x, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = x + t * 2 * I;
      const float* up = gate + I;
      float* o = out + t * I;
      int64_t i = 0;
#ifdef __AVX512F__
      const __m512 one = _mm512_set1_ps(1.0f);
      for (; i + 16 <= I; i += 16) {
        const __m512 gv = _mm512_loadu_ps(gate + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, e));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
      }
#elif defined(__AVX2__) && defined(__FMA__)
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(gate + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
      }
#endif
      for (; i < I; ++i) {
        const float gv = gate[i];
        o[i] = gv / (1.0f + std::exp(-gv)) * up[i];
      }
    }
  });
}

// Copy token t's K and V (heads*D floats each, starting at k + t*row_stride) into its slot.
void write_kv_rows(const float* k, const float* v, int64_t row_stride, float* k_cache,
                   float* v_cache, const int64_t* slots, int64_t rows, int64_t token_floats) {
  for (int64_t t = 0; t < rows; ++t) {
    std::memcpy(k_cache + slots[t] * token_floats, k + t * row_stride, token_floats * 4);
    std::memcpy(v_cache + slots[t] * token_floats, v + t * row_stride, token_floats * 4);
  }
}

void check_slots(const Tensor& slots, int64_t rows, int64_t num_slots) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == rows,
              "slot_mapping must be a contiguous int64 tensor with one entry per token");
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < rows; ++t)
    TORCH_CHECK(s[t] >= 0 && s[t] < num_slots, "slot ", s[t], " out of range [0, ", num_slots,
                ")");
}

// ---------------------------------------------------------------------------------------------
// Python-facing ops
// ---------------------------------------------------------------------------------------------

Tensor paged_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& block_tables, const Tensor& context_lens,
                       const Tensor& cu_seqlens_q, double scale) {
  check_f32_contig(q, "q");
  TORCH_CHECK(q.dim() == 3, "q must be (T, num_heads, head_dim)");
  check_attention_inputs(k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, q.size(1));
  TORCH_CHECK(q.size(2) == k_cache.size(3), "q and the caches disagree on head_dim");
  const int64_t B = context_lens.size(0);
  TORCH_CHECK(cu_seqlens_q.data_ptr<int32_t>()[B] == q.size(0),
              "cu_seqlens_q[-1] must equal the number of query tokens");
  Tensor out = at::empty_like(q);
  const int64_t row = q.size(1) * q.size(2);
  const AttnShape s = make_shape(q.size(1), k_cache, block_tables, row, row, scale);
  paged_attention_raw(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                      out.data_ptr<float>(), block_tables.data_ptr<int32_t>(),
                      context_lens.data_ptr<int32_t>(), cu_seqlens_q.data_ptr<int32_t>(), B, s);
  return out;
}

Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  check_f32_contig(x, "x");
  check_f32_contig(w, "weight");
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.numel() == n, "weight must have the last dim's size");
  Tensor out = at::empty_like(x);
  rms_norm_rows(out.data_ptr<float>(), n, x.data_ptr<float>(), n, w.data_ptr<float>(),
                x.numel() / n, n, static_cast<float>(eps));
  return out;
}

void fused_add_rms_norm(Tensor& x, Tensor& residual, const Tensor& w, double eps) {
  check_f32_contig(x, "x");
  check_f32_contig(residual, "residual");
  check_f32_contig(w, "weight");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual must have one shape");
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.numel() == n, "weight must have the last dim's size");
  add_rms_norm_rows(x.data_ptr<float>(), residual.data_ptr<float>(), w.data_ptr<float>(),
                    x.numel() / n, n, static_cast<float>(eps));
}

void check_positions(const Tensor& positions, int64_t rows, int64_t max_pos) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == rows,
              "positions must be a contiguous int64 tensor with one entry per token");
  const int64_t* p = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < rows; ++t)
    TORCH_CHECK(p[t] >= 0 && p[t] < max_pos, "position ", p[t], " outside the rotary table");
}

void rotary_embedding(const Tensor& positions, Tensor& q, Tensor& k, const Tensor& cos,
                      const Tensor& sin) {
  check_f32_contig(q, "q");
  check_f32_contig(k, "k");
  check_f32_contig(cos, "cos");
  check_f32_contig(sin, "sin");
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK(cos.size(1) * 2 == D, "cos/sin must be (max_positions, head_dim / 2)");
  check_positions(positions, T, cos.size(0));
  const int64_t* p = positions.data_ptr<int64_t>();
  rope_rows(q.data_ptr<float>(), q.size(1) * D, q.size(1), D, p, cos.data_ptr<float>(),
            sin.data_ptr<float>(), T);
  rope_rows(k.data_ptr<float>(), k.size(1) * D, k.size(1), D, p, cos.data_ptr<float>(),
            sin.data_ptr<float>(), T);
}

Tensor packed_linear(const Tensor& x, const Tensor& w_packed, int64_t n, const Tensor& bias) {
  check_f32_contig(x, "x");
  check_f32_contig(w_packed, "packed weight");
  TORCH_CHECK(kHavePackedMatmul, "the packed matmul needs AVX-512 or AVX2 with FMA");
  TORCH_CHECK(w_packed.dim() == 3 && w_packed.size(2) == kPanel && w_packed.size(1) == x.size(1) &&
                  w_packed.size(0) * kPanel >= n,
              "packed weight must be (panels, K, ", kPanel, ") for x's K");
  Tensor out = at::empty({x.size(0), n}, x.options());
  packed_linear_out(out, x, w_packed, n, bias);
  return out;
}

Tensor silu_and_mul(const Tensor& x) {
  check_f32_contig(x, "x");
  const int64_t I = x.size(-1) / 2;
  Tensor out = at::empty({x.numel() / (2 * I), I}, x.options());
  silu_mul_rows(out.data_ptr<float>(), x.data_ptr<float>(), x.numel() / (2 * I), I);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The whole forward
// ---------------------------------------------------------------------------------------------

// in_norm, qkv_w, qkv_b, q_norm, k_norm, o_w, post_norm, gate_up_w, down_w; the four matmul
// weights (and lm_head) are packed by pack_weight.
constexpr int kPerLayer = 9;

struct ModelDims {
  int64_t num_layers, num_heads, num_kv_heads, head_dim, hidden, intermediate;
  float eps;
};

// logits (S, vocab) for the rows in logits_indices. `weights` holds kPerLayer tensors per layer
// (undefined/empty ones where a model has no such weight), then embed, final_norm, lm_head.
Tensor forward(const Tensor& input_ids, const Tensor& positions, const Tensor& slot_mapping,
               const Tensor& block_tables, const Tensor& context_lens,
               const Tensor& cu_seqlens_q, const Tensor& logits_indices, Tensor& kv_cache,
               const std::vector<Tensor>& weights, const Tensor& cos, const Tensor& sin,
               int64_t num_heads, int64_t intermediate, int64_t vocab, double eps) {
  TORCH_CHECK(kHavePackedMatmul, "the fused CPU forward needs AVX-512 or AVX2 with FMA");
  check_f32_contig(kv_cache, "kv_cache");
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == 2,
              "kv_cache must be (L, 2, num_blocks, block_size, num_kv_heads, head_dim)");
  const int64_t L = kv_cache.size(0);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kPerLayer + 3,
              "expected ", L * kPerLayer + 3, " weight tensors, got ", weights.size());
  const Tensor& embed = weights[L * kPerLayer];
  const Tensor& final_norm = weights[L * kPerLayer + 1];
  const Tensor& lm_head = weights[L * kPerLayer + 2];
  const int64_t T = input_ids.numel();
  const int64_t Hkv = kv_cache.size(4), D = kv_cache.size(5), bs = kv_cache.size(3);
  const int64_t H = embed.size(1);
  const int64_t q_size = num_heads * D, kv_size = Hkv * D, qkv_size = q_size + 2 * kv_size;
  const int64_t I = intermediate;
  const float feps = static_cast<float>(eps);
  TORCH_CHECK(T > 0, "empty batch");
  TORCH_CHECK(input_ids.scalar_type() == at::kLong && input_ids.is_contiguous(),
              "input_ids must be contiguous int64");
  check_positions(positions, T, cos.size(0));
  check_slots(slot_mapping, T, kv_cache.size(2) * bs);
  Tensor k0 = kv_cache.select(0, 0).select(0, 0);
  check_attention_inputs(k0, k0, block_tables, context_lens, cu_seqlens_q, num_heads);
  TORCH_CHECK(cu_seqlens_q.data_ptr<int32_t>()[context_lens.size(0)] == T,
              "cu_seqlens_q[-1] must equal the number of tokens");

  auto opts = embed.options();
  Tensor residual = at::index_select(embed, 0, input_ids);  // (T, H)
  Tensor h = at::empty({T, H}, opts);
  Tensor qkv = at::empty({T, qkv_size}, opts);
  Tensor attn = at::empty({T, q_size}, opts);
  Tensor act = at::empty({T, I}, opts);
  Tensor gate_up = at::empty({T, 2 * I}, opts);
  rms_norm_rows(h.data_ptr<float>(), H, residual.data_ptr<float>(), H,
                weights[0].data_ptr<float>(), T, H, feps);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const AttnShape shape = make_shape(num_heads, k0, block_tables, qkv_size, q_size, 0.0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t token_floats = kv_size;
  for (int64_t layer = 0; layer < L; ++layer) {
    const Tensor* w = &weights[layer * kPerLayer];
    packed_linear_out(qkv, h, w[1], qkv_size, w[2]);
    float* qp = qkv.data_ptr<float>();
    float* kp = qp + q_size;
    float* vp = kp + kv_size;
    if (w[3].defined() && w[3].numel() > 0) {  // Qwen3: RMSNorm per head on q and k
      for (int64_t t = 0; t < T; ++t) {
        rms_norm_rows(qp + t * qkv_size, D, qp + t * qkv_size, D, w[3].data_ptr<float>(),
                      num_heads, D, feps);
        rms_norm_rows(kp + t * qkv_size, D, kp + t * qkv_size, D, w[4].data_ptr<float>(), Hkv,
                      D, feps);
      }
    }
    rope_rows(qp, qkv_size, num_heads, D, pos, cos.data_ptr<float>(), sin.data_ptr<float>(), T);
    rope_rows(kp, qkv_size, Hkv, D, pos, cos.data_ptr<float>(), sin.data_ptr<float>(), T);
    float* kc = kv_cache.data_ptr<float>() + layer * kv_cache.stride(0);
    float* vc = kc + kv_cache.stride(1);
    write_kv_rows(kp, vp, qkv_size, kc, vc, slot_mapping.data_ptr<int64_t>(), T, token_floats);
    AttnShape s = shape;
    s.scale = scale;
    paged_attention_raw(qp, kc, vc, attn.data_ptr<float>(), block_tables.data_ptr<int32_t>(),
                        context_lens.data_ptr<int32_t>(), cu_seqlens_q.data_ptr<int32_t>(),
                        context_lens.size(0), s);
    packed_linear_out(h, attn, w[5], H, Tensor());  // o_proj
    add_rms_norm_rows(h.data_ptr<float>(), residual.data_ptr<float>(), w[6].data_ptr<float>(),
                      T, H, feps);
    packed_linear_out(gate_up, h, w[7], 2 * I, Tensor());
    silu_mul_rows(act.data_ptr<float>(), gate_up.data_ptr<float>(), T, I);
    packed_linear_out(h, act, w[8], H, Tensor());  // down_proj
    const Tensor& next_norm = layer + 1 < L ? weights[(layer + 1) * kPerLayer] : final_norm;
    add_rms_norm_rows(h.data_ptr<float>(), residual.data_ptr<float>(),
                      next_norm.data_ptr<float>(), T, H, feps);
  }
  Tensor rows = at::index_select(h, 0, logits_indices);  // only the rows that sample
  Tensor logits = at::empty({rows.size(0), vocab}, opts);
  packed_linear_out(logits, rows, lm_head, vocab, Tensor());
  return logits;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pdserve CPU kernels: in-place paged attention, fused ops, the fused forward";
  // The long calls release the GIL: a serving process's gRPC threads turn the previous step's
  // outputs into responses while the forward runs.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("paged_attention", &paged_attention, "paged attention over a flat varlen batch", release());
  m.def("rms_norm", &rms_norm);
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x; x = rms_norm(residual) * w");
  m.def("rotary_embedding", &rotary_embedding, "rotate-half RoPE in place on q and k");
  m.def("silu_and_mul", &silu_and_mul);
  m.def("has_avx512", []() { return kHaveAvx512; });
  m.def("has_packed_matmul", []() { return kHavePackedMatmul; },
        "whether this build has the packed matmul (AVX-512, or AVX2 with FMA) the forward needs");
  m.def("pack_weight", &pack_weight);
  m.def("packed_linear", &packed_linear, "x @ w.T + bias with w from pack_weight", release());
  m.def("forward", &forward, "the whole decoder forward; logits of the sampled rows", release());
}

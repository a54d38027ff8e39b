// vattn's CPU attention: one call per layer per step for a whole ragged batch (prefill, chunked prefill and
// decode mixed), over the virtually contiguous cache or over a paged pool. The CPU counterpart of
// FlashAttention's cache_seqlens / cache_batch_idx (contiguous) and block_table (paged) arguments.
//
// Contract (checked before anything is read or written):
//   q, out       [T, H, D]; sequence b's tokens are q[cu_q[b] : cu_q[b+1]]  (qlen_b = cu_q[b+1] - cu_q[b])
//   k/v caches   [R, P, Hk, D] with any strides but a contiguous last axis (the interleaved layout's
//                per-layer views have a token stride larger than Hk * D)
//   rows         contiguous: int32 [B], the row (slot) of each sequence, page = 0
//                paged:      int32 [B, W], the block table of each sequence, page = P (tokens per block)
//   context_lens int32 [B]: after this step sequence b holds ctx_b tokens; its queries sit at positions
//                [ctx_b - qlen_b, ctx_b) and query j sees keys at positions <= ctx_b - qlen_b + j
//                (bottom-right causal). H must be a multiple of Hk (GQA: query head h reads kv head h / (H/Hk)).
//   k_new/v_new  optional [T, Hk, D]: written at the queries' own positions before attending (the step's
//                K/V write, fused into the same call).
// Key n of sequence b lives at row = rows[b], position n (contiguous) or row = rows[b, n / P], position
// n % P (paged): the only difference between the two layouts. No position >= ctx_b of any sequence is
// ever touched: on the vAttention cache those addresses may be unmapped, and reading them kills the process.
//
// Work is split over (sequence, kv head, tile of QTILE queries); each item streams its keys in blocks of
// KBLOCK with an online softmax, every query head of the GQA group sharing each key and value row it loads.
// Items are handed out longest first from an atomic counter, on torch's intra-op threads (at::parallel_for).
// Inputs may be float32, bfloat16 or float16; scores, softmax and accumulators are float32.

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/python.h>

#include <algorithm>
#include <bit>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vec_exp.h"  // vattn/csrc/: e^x, 16 lanes

namespace {

constexpr int64_t QTILE = 32;   // query tokens per work item
constexpr int64_t KBLOCK = 64;  // keys per online-softmax block
constexpr int64_t PREFETCH = 8;  // keys ahead: a head's key row is a few cache lines at a stride of all kv heads,
                                 // which the hardware prefetchers follow poorly; without this decode waits on memory

// Ask for the cache lines of one row of `bytes` ahead of use (a hint: never faults, even on unmapped memory).
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// A row of D values as float: the row itself for float32, else converted into buf.
template <typename T>
inline const float* as_float(const T* src, float* buf, int64_t D) {
  for (int64_t d = 0; d < D; ++d) buf[d] = to_float(src[d]);
  return buf;
}
template <>
inline const float* as_float<float>(const float* src, float*, int64_t) { return src; }

// The softmax helpers below reduce LANES partial results lane-wise, then in a tree, so they vectorize without
// fast-math.
constexpr int64_t LANES = 16;

// a . b over D floats, reduced in registers: a compiler-vectorized reduction goes through the stack (a vector store,
// then scalar reloads), which stalls on every one of the batch's many short dot products.
#if defined(__AVX512F__)
inline float dot(const float* a, const float* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  if (d < D) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (D - d)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + d), _mm512_maskz_loadu_ps(tail, b + d), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#elif defined(__AVX2__) && defined(__FMA__)
inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  float s = _mm_cvtss_f32(x);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}
#else
inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}
#endif

// e^x for the softmax's x = score - max <= 0, in plain arithmetic the compiler vectorizes (libm's expf is a call
// per element): x = k ln2 + f with |f| <= ln2 / 2, e^f by Cephes' degree-6 polynomial, 2^k through the exponent
// bits. About 1 ulp; x < -87 (including -inf, a hidden key) gives exactly 0; NaN stays NaN.
inline float exp_nonpositive(float x) {
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float f = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.f;
  const int32_t e = static_cast<int32_t>(std::max(k, -127.f)) + 127;
  const float scale = std::bit_cast<float>(static_cast<uint32_t>(e) << 23);
  return x < -87.f ? 0.f : p * scale;
}

#if defined(__AVX512F__)
// The same e^x, sixteen lanes at a time (vec_exp.h; the scalar one stays scalar: its select and bit casts defeat
// the vectorizer).
inline __m512 exp_nonpositive(__m512 x) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_NLT_UQ), vattn::exp16(x));  // x < -87: 0
}

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// max(init, x[0..n))
inline float block_max(const float* x, int64_t n, float init) {
  __m512 m = _mm512_set1_ps(init);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + c));
  if (c < n) m = _mm512_mask_max_ps(m, tail_mask(n - c), m, _mm512_maskz_loadu_ps(tail_mask(n - c), x + c));
  return _mm512_reduce_max_ps(m);
}

// x[c] = e^(x[c] - mx) in place; returns their sum.
inline float exp_sub_sum(float* x, int64_t n, float mx) {
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + c), vm));
    _mm512_storeu_ps(x + c, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (c < n) {
    const __mmask16 t = tail_mask(n - c);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, x + c), vm));
    _mm512_mask_storeu_ps(x + c, t, e);
    sum = _mm512_mask_add_ps(sum, t, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}
#elif defined(__AVX2__) && defined(__FMA__)
// Eight lanes (vec_exp.h), the scalar e^x above for the tails.
inline __m256 exp_nonpositive(__m256 x) {
  return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_NLT_UQ), vattn::exp8(x));  // x < -87: 0
}

inline float hmax(__m256 m) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

inline float hsum(__m256 a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

// max(init, x[0..n))
inline float block_max(const float* x, int64_t n, float init) {
  __m256 m = _mm256_set1_ps(init);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + c));
  float r = hmax(m);
  for (; c < n; ++c) r = std::max(r, x[c]);
  return r;
}

// x[c] = e^(x[c] - mx) in place; returns their sum.
inline float exp_sub_sum(float* x, int64_t n, float mx) {
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + c), vm));
    _mm256_storeu_ps(x + c, e);
    sum = _mm256_add_ps(sum, e);
  }
  float r = hsum(sum);
  for (; c < n; ++c) {
    x[c] = exp_nonpositive(x[c] - mx);
    r += x[c];
  }
  return r;
}
#else
// max(init, x[0..n)), lane-wise then a tree, so that it vectorizes without fast-math.
inline float block_max(const float* x, int64_t n, float init) {
  float lane[LANES];
  std::fill(lane, lane + LANES, init);
  int64_t c = 0;
  for (; c + LANES <= n; c += LANES) {
    for (int64_t i = 0; i < LANES; ++i) lane[i] = std::max(lane[i], x[c + i]);
  }
  for (; c < n; ++c) lane[0] = std::max(lane[0], x[c]);
  for (int64_t w = LANES / 2; w > 0; w /= 2) {
    for (int64_t i = 0; i < w; ++i) lane[i] = std::max(lane[i], lane[i + w]);
  }
  return lane[0];
}

// x[c] = e^(x[c] - mx) in place; returns their sum.
inline float exp_sub_sum(float* x, int64_t n, float mx) {
  float lane[LANES] = {};
  int64_t c = 0;
  for (; c + LANES <= n; c += LANES) {
    for (int64_t i = 0; i < LANES; ++i) {
      x[c + i] = exp_nonpositive(x[c + i] - mx);
      lane[i] += x[c + i];
    }
  }
  for (; c < n; ++c) {
    x[c] = exp_nonpositive(x[c] - mx);
    lane[0] += x[c];
  }
  for (int64_t w = LANES / 2; w > 0; w /= 2) {
    for (int64_t i = 0; i < w; ++i) lane[i] += lane[i + w];
  }
  return lane[0];
}

#endif

inline void axpy(float* y, float a, const float* x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

// The tile path (many query rows per item: prefill and long chunks) works on a block of KBLOCK keys at once, as two
// small matrix products with no horizontal reductions: scores s[c] = q . k_c from the block's keys stored transposed
// (kt[d * KBLOCK + c]), then acc += sum_c p[c] * v_c with the row's accumulator held in registers.
constexpr int64_t TILE_ROWS = 8;  // items with at least this many query rows take the tile path

#if defined(__AVX512F__)
inline void block_scores(const float* q, const float* kt, float* s, int64_t D) {
  static_assert(KBLOCK == 64, "block_scores holds one block in four registers");
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t d = 0; d < D; ++d) {
    const __m512 qd = _mm512_set1_ps(q[d]);
    const float* k = kt + d * KBLOCK;
    a0 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k), a0);
    a1 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + 16), a1);
    a2 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + 32), a2);
    a3 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + 48), a3);
  }
  _mm512_storeu_ps(s, a0);
  _mm512_storeu_ps(s + 16, a1);
  _mm512_storeu_ps(s + 32, a2);
  _mm512_storeu_ps(s + 48, a3);
}

template <int64_t NREG>
inline void block_pv_regs(float* acc, const float* p, const float* vb, int64_t nb) {
  __m512 a[NREG];
  for (int64_t i = 0; i < NREG; ++i) a[i] = _mm512_loadu_ps(acc + 16 * i);
  for (int64_t c = 0; c < nb; ++c) {
    const __m512 pc = _mm512_set1_ps(p[c]);
    const float* v = vb + c * NREG * 16;
    for (int64_t i = 0; i < NREG; ++i) a[i] = _mm512_fmadd_ps(pc, _mm512_loadu_ps(v + 16 * i), a[i]);
  }
  for (int64_t i = 0; i < NREG; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
}

// acc[0..D) += sum_c p[c] * vb[c * D .. + D)
inline void block_pv(float* acc, const float* p, const float* vb, int64_t nb, int64_t D) {
  switch (D) {
    case 32: return block_pv_regs<2>(acc, p, vb, nb);
    case 64: return block_pv_regs<4>(acc, p, vb, nb);
    case 128: return block_pv_regs<8>(acc, p, vb, nb);
    case 256: return block_pv_regs<16>(acc, p, vb, nb);
    default:
      for (int64_t c = 0; c < nb; ++c) axpy(acc, p[c], vb + c * D, D);
  }
}
#else
inline void block_scores(const float* q, const float* kt, float* s, int64_t D) {
  float a[KBLOCK] = {};
  for (int64_t d = 0; d < D; ++d) {
    const float qd = q[d];
    for (int64_t c = 0; c < KBLOCK; ++c) a[c] += qd * kt[d * KBLOCK + c];
  }
  std::memcpy(s, a, sizeof(a));
}

inline void block_pv(float* acc, const float* p, const float* vb, int64_t nb, int64_t D) {
  for (int64_t c = 0; c < nb; ++c) axpy(acc, p[c], vb + c * D, D);
}
#endif

// Where key (or value) n of sequence b lives, in elements from the cache's base.
struct Layout {
  const int32_t* rows;
  int64_t rows_stride;  // paged: the block table's row stride; contiguous: unused
  int64_t page;         // paged: tokens per block; contiguous: 0
  int64_t k_row, k_pos, k_head, v_row, v_pos, v_head;

  template <bool PAGED>
  inline void locate(int64_t b, int64_t n, int64_t& row, int64_t& pos) const {
    if (PAGED) {
      row = rows[b * rows_stride + n / page];
      pos = n % page;
    } else {
      row = rows[b];
      pos = n;
    }
  }

  // f(c, row, pos) for keys n0 + c, c in [0, nb): one division per call where the paged layout needs one per key.
  template <bool PAGED, typename F>
  inline void walk(int64_t b, int64_t n0, int64_t nb, F&& f) const {
    if (!PAGED) {
      for (int64_t c = 0; c < nb; ++c) f(c, static_cast<int64_t>(rows[b]), n0 + c);
      return;
    }
    const int32_t* table = rows + b * rows_stride;
    int64_t blk = n0 / page, pos = n0 - blk * page;
    for (int64_t c = 0; c < nb; ++c) {
      f(c, static_cast<int64_t>(table[blk]), pos);
      if (++pos == page) pos = 0, ++blk;
    }
  }
};

// Query tokens [t0, t1) of sequence b, kv heads [kv_head, kv_head + num_kv). A decode token takes all kv heads of its
// sequence in one item when the batch is large enough to keep every thread busy: its keys and values are then read
// as one stream of whole positions (all heads are adjacent in memory) instead of one head's slice of each.
struct Item {
  int64_t b, kv_head, num_kv, t0, t1, cost;
};

// The decode path (one query row per kv head and query head: decode tokens, 1-row tiles), float32, D = W * DV for a
// vector of W lanes (sixteen with AVX-512, eight with AVX2). Per kv head: every score of its G query heads first, W
// keys at a time, then an exact softmax over the whole context, then the values with the G accumulators held in
// registers. Each key and value row is read once.
#if defined(__AVX512F__)
#define VATTN_DECODE_VEC 1

// Lane c of the result = the sum of the lanes of a[KEY_LANE[c]]: four levels of adds over shuffled pairs (45
// operations for sixteen dot products, where sixteen horizontal sums take about three times that). The tree leaves
// lane 4k + m holding a[4m + k], so dot products are stored at that slot (key c at a[KEY_SLOT[c]]) to come out in order.
constexpr int KEY_SLOT[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

inline __m512 sum16(const __m512* a) {
  __m512 r[8], s[4], t[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: r[i] = a[2i]'s 8 partial sums | a[2i+1]'s
    r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit quarters: s[i] = 4 partial sums each of a[4i .. 4i+3]
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // pairs within each quarter
    t[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

struct Vec {  // sixteen float32 lanes; 32 registers
  using R = __m512;
  static constexpr int64_t W = 16, REGS = 32;
  static constexpr bool TOUCH = true;  // load each block in memory order first (decode_rows): measured on Zen 4
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R bor(R a, R b) { return _mm512_or_ps(a, b); }
  static constexpr int slot(int c) { return KEY_SLOT[c]; }
  static R sum_lanes(const R* a) { return sum16(a); }  // lane c = the sum of a[slot(c)]'s lanes
};
#elif defined(__AVX2__) && defined(__FMA__)
#define VATTN_DECODE_VEC 1

struct Vec {  // eight float32 lanes; 16 registers
  using R = __m256;
  static constexpr int64_t W = 8, REGS = 16;
  // No touch (decode_rows): on Zen 1 (AVX2 only) the hardware prefetchers stream the head-by-head reads and the
  // extra pass costs more than it saves (cold caches, 4-layer decode shape: 0.87x the time without it).
  static constexpr bool TOUCH = false;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R bor(R a, R b) { return _mm256_or_ps(a, b); }
  static constexpr int slot(int c) { return c; }
  // lane c = the sum of a[c]'s lanes: pairwise adds within 128-bit halves, then the halves' sums added across.
  static R sum_lanes(const R* a) {
    const R t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const R t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const R u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [a0..a3 low halves | a0..a3 high], a4..a7
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
};
#endif

#if defined(VATTN_DECODE_VEC)
constexpr int64_t VW = Vec::W;  // lanes
using VR = Vec::R;

// Scores of one query row (already scaled) against up to VW key rows: lane c = q . k[c] (0 past nb, never read).
template <int64_t DV>
inline VR scores_block(const float* q, const float* const* k, int64_t nb) {
  VR qv[DV], a[VW];
  for (int64_t i = 0; i < DV; ++i) qv[i] = Vec::load(q + VW * i);
  for (int c = 0; c < VW; ++c) {
    VR acc = Vec::zero();
    if (c < nb) {
      for (int64_t i = 0; i < DV; ++i) acc = Vec::fmadd(qv[i], Vec::load(k[c] + VW * i), acc);
    }
    a[Vec::slot(c)] = acc;
  }
  return Vec::sum_lanes(a);
}

// acc[r] += sum_c p[r][c] v[c] over one block of nb <= VW value rows, for NR rows whose accumulators live in memory
// between blocks (acc[r * D ..]) and in registers within one.
template <int64_t DV, int64_t NR>
inline void values_block(const float* const* v, int64_t nb, const float* p, int64_t ps, float* acc) {
  VR a[NR][DV];
  for (int64_t r = 0; r < NR; ++r) {
    for (int64_t i = 0; i < DV; ++i) a[r][i] = Vec::load(acc + r * VW * DV + VW * i);
  }
  for (int64_t c = 0; c < nb; ++c) {
    VR vv[DV];
    for (int64_t i = 0; i < DV; ++i) vv[i] = Vec::load(v[c] + VW * i);
    for (int64_t r = 0; r < NR; ++r) {
      const VR pr = Vec::set1(p[r * ps + c]);
      for (int64_t i = 0; i < DV; ++i) a[r][i] = Vec::fmadd(pr, vv[i], a[r][i]);
    }
  }
  for (int64_t r = 0; r < NR; ++r) {
    for (int64_t i = 0; i < DV; ++i) Vec::store(acc + r * VW * DV + VW * i, a[r][i]);
  }
}

// Rows of one kv head's G query heads taken together over a block of values: as many as keep their accumulators
// and one value row in registers (at least one).
template <int64_t DV>
constexpr int64_t VALUE_ROWS = Vec::REGS >= 32 ? (DV >= 8 ? 2 : DV >= 4 ? 4 : 8)
                                               : (DV >= 8 ? 1 : DV >= 4 ? 2 : DV >= 2 ? 4 : 8);

template <int64_t DV, int64_t NR = VALUE_ROWS<DV>>
inline void values(const float* const* v, int64_t nb, const float* p, int64_t ps, float* acc, int64_t rows) {
  if constexpr (NR > 1) {
    if (rows < NR) return values<DV, NR - 1>(v, nb, p, ps, acc, rows);
  }
  values_block<DV, NR>(v, nb, p, ps, acc);
}

// The rows (pointers) of keys or values [n0, n0 + nb) of sequence b, kv head h.
template <bool PAGED>
inline void block_rows(const Layout& L, int64_t b, int64_t n0, int64_t nb, const float* base, int64_t row_stride,
                       int64_t pos_stride, int64_t head_off, const float** out) {
  L.walk<PAGED>(b, n0, nb, [&](int64_t c, int64_t row, int64_t pos) {
    out[c] = base + row * row_stride + pos * pos_stride + head_off;
  });
}

// Load every row of keys or values [n0, n0 + nb) of sequence b, kv heads [h0, h1) once, in memory order (position
// by position, its heads in turn): the misses go out together as one forward stream, and the arithmetic that follows
// reads the block from L1 in the order it wants.
template <int64_t DV, bool PAGED>
inline void touch_block(const Layout& L, int64_t b, int64_t n0, int64_t nb, int64_t h0, int64_t h1, const float* base,
                        int64_t row_stride, int64_t pos_stride, int64_t head_stride) {
  VR x = Vec::zero();
  L.walk<PAGED>(b, n0, nb, [&](int64_t, int64_t row, int64_t pos) {
    const float* p = base + row * row_stride + pos * pos_stride;
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t i = 0; i < DV; ++i) x = Vec::bor(x, Vec::load(p + h * head_stride + VW * i));
    }
  });
  asm volatile("" : : "v"(x));  // the loads are the point: keep them
}

// One query row per query head, seeing keys [0, n_keys) of sequence b, kv heads [h0, h1). q and out point at the
// token's row ([H, D] with head strides q_h, o_h). Both passes walk the positions in blocks of VW: the arithmetic
// goes kv head by kv head (VW keys of one head, for all its G query heads), but each block is first loaded in memory
// order (touch_block) where that measured faster (Vec::TOUCH). Head by head alone jumps through memory by the
// position stride, which Zen 4's hardware prefetchers follow poorly (software prefetches did not help: the loads
// that miss are what stalls): with the touch, 0.5-0.7x the time on cold caches there (one core). Zen 1's follow it.
template <int64_t DV, bool PAGED>
void decode_rows(const Layout& L, int64_t b, int64_t h0, int64_t h1, int64_t n_keys, int64_t G, const float* q,
                 int64_t q_h, float* out, int64_t o_h, const float* kc, const float* vc, float scale,
                 std::vector<float>& ws) {
  constexpr int64_t D = VW * DV;
  const int64_t np = (n_keys + VW - 1) / VW * VW, R = (h1 - h0) * G;  // a score row's stride; rows (kv head, g)
  ws.resize(R * np + 2 * R * D + R);
  float* s = ws.data();      // [R, np] scores, then probabilities
  float* qs = s + R * np;    // [R, D] scaled queries
  float* acc = qs + R * D;   // [R, D]
  float* inv = acc + R * D;  // [R] 1 / each row's softmax sum
  for (int64_t r = 0; r < R; ++r) {
    const float* src = q + (h0 * G + r) * q_h;
    for (int64_t d = 0; d < D; ++d) qs[r * D + d] = src[d] * scale;
  }
  // Positions per touch: blocks of VW, doubled up to 64 while under about 8 KiB, a quarter of L1 (measured on Zen 4:
  // 16 KiB blocks of 1 KiB rows best at 16, 256-byte rows best at 32; touching past L1's size evicts the block
  // before it is used).
  int64_t tb = VW;
  while (tb < 64 && tb * (h1 - h0) * D * static_cast<int64_t>(sizeof(float)) < 8192) tb *= 2;
  const float* rows[VW];
  for (int64_t n0 = 0; n0 < n_keys; n0 += VW) {
    const int64_t nb = std::min(VW, n_keys - n0);
    if (Vec::TOUCH && n0 % tb == 0) {
      touch_block<DV, PAGED>(L, b, n0, std::min(tb, n_keys - n0), h0, h1, kc, L.k_row, L.k_pos, L.k_head);
    }
    for (int64_t h = h0; h < h1; ++h) {
      block_rows<PAGED>(L, b, n0, nb, kc, L.k_row, L.k_pos, h * L.k_head, rows);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (h - h0) * G + g;
        Vec::store(s + r * np + n0, scores_block<DV>(qs + r * D, rows, nb));  // (lanes past nb: 0, within np)
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * np;
    const float mx = block_max(sr, n_keys, -std::numeric_limits<float>::infinity());
    inv[r] = 1.f / exp_sub_sum(sr, n_keys, mx);
  }
  std::fill(acc, acc + R * D, 0.f);
  for (int64_t n0 = 0; n0 < n_keys; n0 += VW) {
    const int64_t nb = std::min(VW, n_keys - n0);
    if (Vec::TOUCH && n0 % tb == 0) {
      touch_block<DV, PAGED>(L, b, n0, std::min(tb, n_keys - n0), h0, h1, vc, L.v_row, L.v_pos, L.v_head);
    }
    for (int64_t h = h0; h < h1; ++h) {
      block_rows<PAGED>(L, b, n0, nb, vc, L.v_row, L.v_pos, h * L.v_head, rows);
      for (int64_t g0 = 0; g0 < G; g0 += VALUE_ROWS<DV>) {
        const int64_t r = (h - h0) * G + g0;
        values<DV>(rows, nb, s + r * np + n0, np, acc + r * D, std::min(VALUE_ROWS<DV>, G - g0));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* dst = out + (h0 * G + r) * o_h;
    for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d] * inv[r];
  }
}
#endif

template <typename T, bool PAGED>
void write_kv(const Layout& L, T* kc, T* vc, const T* kn, const T* vn, const int32_t* cu, const int32_t* ctx,
              int64_t B, int64_t Hk, int64_t D, int64_t kn_t, int64_t kn_h, int64_t vn_t, int64_t vn_h) {
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t qlen = cu[b + 1] - cu[b], start = ctx[b] - qlen;
      for (int64_t j = 0; j < qlen; ++j) {
        int64_t row, pos, t = cu[b] + j;
        L.locate<PAGED>(b, start + j, row, pos);
        for (int64_t h = 0; h < Hk; ++h) {
          std::memcpy(kc + row * L.k_row + pos * L.k_pos + h * L.k_head, kn + t * kn_t + h * kn_h, D * sizeof(T));
          std::memcpy(vc + row * L.v_row + pos * L.v_pos + h * L.v_head, vn + t * vn_t + h * vn_h, D * sizeof(T));
        }
      }
    }
  });
}

// One work item. Its rows are (token, kv head, query head of the GQA group), in that order.
template <typename T, bool PAGED>
void attend(const Layout& L, const Item& it, const T* q, T* out, const T* kc, const T* vc, const int32_t* cu,
            const int32_t* ctxs, int64_t G, int64_t D, int64_t q_t, int64_t q_h, int64_t o_t, int64_t o_h,
            float scale, std::vector<float>& ws) {
  const int64_t b = it.b, kvh = it.kv_head, nkv = it.num_kv, nq = it.t1 - it.t0, W = nkv * G, R = nq * W;
  const int64_t ctx = ctxs[b], qlen = cu[b + 1] - cu[b], first = ctx - qlen;  // position of query 0
  const int64_t kend = first + it.t1;  // the tile's last query sees keys [0, kend)
  const bool tile = nkv == 1 && R >= TILE_ROWS;
  ws.resize(R * D * 2 + R * KBLOCK + R * 2 + D * 2 + (tile ? 2 * KBLOCK * D : 0));
  float* qf = ws.data();            // [R, D] scaled queries, row r = (token t0 + r / W, head kvh * G + r % W)
  float* acc = qf + R * D;          // [R, D]
  float* s = acc + R * D;           // [R, KBLOCK] scores, then probabilities
  float* m = s + R * KBLOCK;        // [R] running max
  float* l = m + R;                 // [R] running sum
  float* kbuf = l + R;              // [D] a converted key row (non-float32 inputs)
  float* vbuf = kbuf + D;           // [D]
  float* kt = vbuf + D;             // tile path: [D, KBLOCK] the block's keys, transposed (zero past the block's end)
  float* vb = kt + KBLOCK * D;      // tile path: [KBLOCK, D] the block's values
  for (int64_t r = 0; r < R; ++r) {
    const T* src = q + (cu[b] + it.t0 + r / W) * q_t + (kvh * G + r % W) * q_h;
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_float(src[d]) * scale;
  }
  std::fill(acc, acc + R * D, 0.f);
  std::fill(m, m + R, -std::numeric_limits<float>::infinity());
  std::fill(l, l + R, 0.f);
  for (int64_t n0 = 0; n0 < kend; n0 += KBLOCK) {
    const int64_t nb = std::min(KBLOCK, kend - n0);
    // Every row sees the whole block unless the block reaches past the tile's first query (the causal corner).
    const bool all_visible = n0 + nb - 1 <= first + it.t0;
    if (tile) {
      L.walk<PAGED>(b, n0, nb, [&](int64_t c, int64_t row, int64_t pos) {
        const float* kf = as_float(kc + row * L.k_row + pos * L.k_pos + kvh * L.k_head, kbuf, D);
        for (int64_t d = 0; d < D; ++d) kt[d * KBLOCK + c] = kf[d];
        const float* vf = as_float(vc + row * L.v_row + pos * L.v_pos + kvh * L.v_head, vbuf, D);
        std::memcpy(vb + c * D, vf, D * sizeof(float));
      });
      for (int64_t c = nb; c < KBLOCK; ++c) {
        for (int64_t d = 0; d < D; ++d) kt[d * KBLOCK + c] = 0.f;
      }
      for (int64_t r = 0; r < R; ++r) {
        float* sr = s + r * KBLOCK;
        block_scores(qf + r * D, kt, sr, D);
        if (!all_visible) {
          const int64_t last = first + it.t0 + r / G;  // the row's query sees keys n <= last
          for (int64_t c = std::max<int64_t>(0, last + 1 - n0); c < nb; ++c) sr[c] = -std::numeric_limits<float>::infinity();
        }
      }
    } else {
      for (int64_t c = 0; c < nb; ++c) {
        const int64_t n = n0 + c;
        int64_t row, pos, prow, ppos;
        L.locate<PAGED>(b, n, row, pos);
        if (n + PREFETCH < kend) L.locate<PAGED>(b, n + PREFETCH, prow, ppos);
        for (int64_t j = 0; j < nkv; ++j) {
          const int64_t h = kvh + j;
          if (n + PREFETCH < kend) prefetch_row(kc + prow * L.k_row + ppos * L.k_pos + h * L.k_head, D * sizeof(T));
          if (c < PREFETCH) {  // the first values of this block, read once the scores are done
            prefetch_row(vc + row * L.v_row + pos * L.v_pos + h * L.v_head, D * sizeof(T));
          }
          const float* kf = as_float(kc + row * L.k_row + pos * L.k_pos + h * L.k_head, kbuf, D);
          for (int64_t t = 0; t < nq; ++t) {
            const bool visible = all_visible || n <= first + it.t0 + t;
            for (int64_t g = 0; g < G; ++g) {
              const int64_t r = t * W + j * G + g;
              s[r * KBLOCK + c] = visible ? dot(qf + r * D, kf, D) : -std::numeric_limits<float>::infinity();
            }
          }
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * KBLOCK;
      const float mx = block_max(sr, nb, m[r]);  // finite: key 0 is visible to every query
      const float alpha = exp_nonpositive(m[r] - mx);  // 0 on the first block (m = -inf)
      const float sum = exp_sub_sum(sr, nb, mx);  // hidden keys (-inf) get exactly 0
      l[r] = l[r] * alpha + sum;
      m[r] = mx;
      if (alpha != 1.f) {
        float* ar = acc + r * D;
        for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      }
    }
    if (tile) {
      for (int64_t r = 0; r < R; ++r) block_pv(acc + r * D, s + r * KBLOCK, vb, nb, D);
      continue;
    }
    for (int64_t c = 0; c < nb; ++c) {
      int64_t row, pos, prow, ppos;
      L.locate<PAGED>(b, n0 + c, row, pos);
      if (c + PREFETCH < nb) L.locate<PAGED>(b, n0 + c + PREFETCH, prow, ppos);
      for (int64_t j = 0; j < nkv; ++j) {
        const int64_t h = kvh + j;
        if (c + PREFETCH < nb) prefetch_row(vc + prow * L.v_row + ppos * L.v_pos + h * L.v_head, D * sizeof(T));
        const float* vf = as_float(vc + row * L.v_row + pos * L.v_pos + h * L.v_head, vbuf, D);
        for (int64_t t = 0; t < nq; ++t) {
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = t * W + j * G + g;
            const float p = s[r * KBLOCK + c];
            if (p != 0.f) axpy(acc + r * D, p, vf, D);
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    T* dst = out + (cu[b] + it.t0 + r / W) * o_t + (kvh * G + r % W) * o_h;
    const float inv = 1.f / l[r];
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[r * D + d] * inv);
  }
}

// Items of one query row go to the decode path where it applies (float32, AVX-512 or AVX2 + FMA, head_dim 16/32/64/
// 128); false: the caller runs the general one.
template <typename T, bool PAGED>
bool decode_item(const Layout& L, const Item& it, const T* q, T* out, const T* kc, const T* vc, const int32_t* cu,
                 const int32_t* ctxs, int64_t G, int64_t D, int64_t q_t, int64_t q_h, int64_t o_t, int64_t o_h,
                 float scale, std::vector<float>& ws) {
#if defined(VATTN_DECODE_VEC)
  if constexpr (std::is_same_v<T, float>) {
    if (it.t1 - it.t0 != 1) return false;
    const int64_t b = it.b, t = cu[b] + it.t0, n_keys = ctxs[b] - (cu[b + 1] - cu[b]) + it.t1;
    const int64_t h0 = it.kv_head, h1 = it.kv_head + it.num_kv;
#define VATTN_DECODE(DV)                                                                                          \
  decode_rows<DV, PAGED>(L, b, h0, h1, n_keys, G, q + t * q_t, q_h, out + t * o_t, o_h, kc, vc, scale, ws); \
  return true;
    switch (D) {
      case 16: VATTN_DECODE(16 / VW)
      case 32: VATTN_DECODE(32 / VW)
      case 64: VATTN_DECODE(64 / VW)
      case 128: VATTN_DECODE(128 / VW)
      default: return false;
    }
#undef VATTN_DECODE
  }
#endif
  return false;
}

template <typename T, bool PAGED>
void run(const Layout& L, const torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kc,
         const torch::Tensor& vc, const int32_t* cu, const int32_t* ctx, int64_t B,
         const c10::optional<torch::Tensor>& k_new, const c10::optional<torch::Tensor>& v_new, double scale) {
  const int64_t H = q.size(1), D = q.size(2), Hk = kc.size(2), G = H / Hk;
  T* kp = kc.data_ptr<T>();
  T* vp = vc.data_ptr<T>();
  if (k_new.has_value()) {
    const auto& kn = *k_new;
    const auto& vn = *v_new;
    write_kv<T, PAGED>(L, kp, vp, kn.data_ptr<T>(), vn.data_ptr<T>(), cu, ctx, B, Hk, D, kn.stride(0), kn.stride(1),
                       vn.stride(0), vn.stride(1));
  }
  std::vector<Item> items;
  const bool whole_decode = B >= 4 * at::get_num_threads();  // enough sequences to spread over the threads
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qlen = cu[b + 1] - cu[b];
    if (qlen == 1 && whole_decode) {
      items.push_back({b, 0, Hk, 0, 1, ctx[b] * Hk});
      continue;
    }
    for (int64_t t0 = 0; t0 < qlen; t0 += QTILE) {
      const int64_t t1 = std::min(qlen, t0 + QTILE), keys = ctx[b] - qlen + t1;
      for (int64_t h = 0; h < Hk; ++h) items.push_back({b, h, 1, t0, t1, (t1 - t0) * keys});
    }
  }
  // Longest first, so that a long prefill tile does not start last and leave the other threads idle.
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> ws;
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t i = next++; i < n; i = next++) {
        const Item& it = items[i];
        if (!decode_item<T, PAGED>(L, it, qp, op, kp, vp, cu, ctx, G, D, q.stride(0), q.stride(1), out.stride(0),
                                   out.stride(1), static_cast<float>(scale), ws)) {
          attend<T, PAGED>(L, it, qp, op, kp, vp, cu, ctx, G, D, q.stride(0), q.stride(1), out.stride(0),
                           out.stride(1), static_cast<float>(scale), ws);
        }
      }
    }
  });
}

void check_inputs(const torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                  const torch::Tensor& rows, const torch::Tensor& context_lens, const torch::Tensor& cu_query_lens,
                  int64_t page, const c10::optional<torch::Tensor>& k_new,
                  const c10::optional<torch::Tensor>& v_new) {
  TORCH_CHECK_VALUE(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [T, H, D] of one shape, got q ",
                    q.sizes(), " out ", out.sizes());
  TORCH_CHECK_VALUE(kc.dim() == 4 && vc.sizes() == kc.sizes(), "k and v caches must be 4-d and of one shape, got ",
                    kc.sizes(), " and ", vc.sizes());
  for (const auto* t : {&out, &q, &kc, &vc}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "cpu attention needs CPU tensors, got one on ", t->device());
    TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type(), "q, out and the caches must share one dtype, got ",
                      q.scalar_type(), " and ", t->scalar_type());
    TORCH_CHECK_VALUE(t->stride(-1) == 1, "the head_dim axis of q, out and the caches must be contiguous");
  }
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hk = kc.size(2);
  TORCH_CHECK_VALUE(kc.size(3) == D, "head_dim differs: q has ", D, ", the caches have ", kc.size(3));
  TORCH_CHECK_VALUE(Hk > 0 && H % Hk == 0, "query heads (", H, ") must be a multiple of kv heads (", Hk, ")");
  for (const auto* t : {&rows, &context_lens, &cu_query_lens}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == torch::kInt32,
                      "slots / block tables, context_lens and cu_query_lens must be int32 CPU tensors");
  }
  TORCH_CHECK_VALUE(context_lens.dim() == 1 && context_lens.is_contiguous(), "context_lens must be a 1-d int32 tensor");
  const int64_t B = context_lens.size(0);
  TORCH_CHECK_VALUE(cu_query_lens.dim() == 1 && cu_query_lens.is_contiguous() && cu_query_lens.size(0) == B + 1,
                    "cu_query_lens must be 1-d with len(context_lens) + 1 = ", B + 1, " entries, got ",
                    cu_query_lens.sizes());
  if (page == 0) {
    TORCH_CHECK_VALUE(rows.dim() == 1 && rows.size(0) == B && rows.is_contiguous(), "slots must be [B = ", B,
                      "] int32, got ", rows.sizes());
  } else {
    TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(0) == B && rows.stride(1) == 1,
                      "block_tables must be [B = ", B, ", max_blocks] int32 with a contiguous last axis, got ",
                      rows.sizes());
    TORCH_CHECK_VALUE(page == kc.size(1), "page (", page, ") must equal the pools' block size ", kc.size(1));
  }
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), "pass both k_new and v_new, or neither");
  if (k_new.has_value()) {
    for (const auto* t : {&*k_new, &*v_new}) {
      TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == T && t->size(1) == Hk && t->size(2) == D,
                        "k_new / v_new must be [T = ", T, ", Hk = ", Hk, ", D = ", D, "], got ", t->sizes());
      TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->stride(2) == 1,
                        "k_new / v_new must be CPU tensors of q's dtype with a contiguous last axis");
    }
  }
  const int32_t* cu = cu_query_lens.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int32_t* r = rows.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(cu[0] == 0 && cu[B] == T, "cu_query_lens must run from 0 to T = ", T, ", got ", cu[0], " .. ",
                    cu[B]);
  const int64_t R = kc.size(0), P = kc.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qlen = cu[b + 1] - cu[b];
    TORCH_CHECK_VALUE(qlen >= 0 && qlen <= ctx[b], "sequence ", b, ": query length ", qlen,
                      " must be between 0 and its context length ", ctx[b]);
    if (page == 0) {
      TORCH_CHECK_VALUE(r[b] >= 0 && r[b] < R, "sequence ", b, ": slot ", r[b], " out of range [0, ", R, ")");
      TORCH_CHECK_VALUE(ctx[b] <= P, "sequence ", b, ": context length ", ctx[b], " exceeds the cache's ", P,
                        " positions");
    } else {
      const int64_t used = (ctx[b] + page - 1) / page;
      TORCH_CHECK_VALUE(used <= rows.size(1), "sequence ", b, ": context length ", ctx[b], " needs ", used,
                        " blocks, its block table has ", rows.size(1));
      for (int64_t i = 0; i < used; ++i) {
        const int32_t blk = r[b * rows.stride(0) + i];
        TORCH_CHECK_VALUE(blk >= 0 && blk < R, "sequence ", b, ": block table entry ", i, " = ", blk,
                          " out of range [0, ", R, ")");
      }
    }
  }
}

// The one entry point of both layouts: page == 0 for the contiguous cache (rows = slots), page == block size for
// the paged pools (rows = block tables).
void attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor rows,
               torch::Tensor context_lens, torch::Tensor cu_query_lens, int64_t page, double scale,
               c10::optional<torch::Tensor> k_new, c10::optional<torch::Tensor> v_new) {
  check_inputs(out, q, k_cache, v_cache, rows, context_lens, cu_query_lens, page, k_new, v_new);
  Layout L{rows.data_ptr<int32_t>(), page ? rows.stride(0) : 0, page,
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const int32_t* cu = cu_query_lens.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int64_t B = context_lens.size(0);
#define VATTN_RUN(T)                                                                        \
  if (page) run<T, true>(L, out, q, k_cache, v_cache, cu, ctx, B, k_new, v_new, scale);  \
  else run<T, false>(L, out, q, k_cache, v_cache, cu, ctx, B, k_new, v_new, scale);
  switch (q.scalar_type()) {
    case torch::kFloat: VATTN_RUN(float) break;
    case torch::kBFloat16: VATTN_RUN(c10::BFloat16) break;
    case torch::kHalf: VATTN_RUN(c10::Half) break;
    default: TORCH_CHECK_VALUE(false, "cpu attention supports float32, bfloat16 and float16, got ", q.scalar_type());
  }
#undef VATTN_RUN
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The calls compute without the interpreter lock (they touch no Python object), so another Python thread, such
  // as the KV cache's page-mapping helper, runs meanwhile instead of taking turns with the step.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("attention", &attention, nogil, "batched causal attention over a contiguous (page=0) or paged KV cache",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("rows"),
        py::arg("context_lens"), py::arg("cu_query_lens"), py::arg("page"), py::arg("scale"),
        py::arg("k_new") = py::none(), py::arg("v_new") = py::none());
}

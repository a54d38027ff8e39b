// vattn's fused CPU layer ops: the elementwise parts of a Llama-family decoder layer, one pass over memory each
// instead of the five to ten torch ops (and temporaries) they take in plain PyTorch. Each computes exactly what the
// plain-torch code in vattn/models/ computes, rounding to the dtype where torch does (built without FMA contraction);
// only sums are reordered, so float32 results agree to within a few ulps.
//
//   rms_norm(out, x, w, eps)            out = w * to_dtype(x * rsqrt(mean(x^2) + eps))   (statistics in float32)
//   add_rms_norm(x, residual, w, eps)   residual += x (in dtype); x = rms_norm(residual)     (both in place)
//   rope(x, cos, sin)                   x = x * cos + rotate_half(x) * sin, in place; x [T, heads, D] with any token
//                                       and head strides (the q/k views of a fused qkv output), cos/sin [T, D]
//   silu_mul(out, x)                    out = silu(x[:, :I]) * x[:, I:] for float32 x [T, 2I] (vector exp: e^x to ~1 ulp)
//   argmax(out, x)                      out[r] = torch.argmax(x[r]) for float32 x [rows, V] (the greedy sampler's)
//   pack_weight(w) -> packed            a float32 weight [N, K] in MKL's packed GEMM layout (bytes)
//   packed_linear(out, x, packed, bias) out = x @ w.T (+ bias) against that packed weight, for any number of rows
//
// Rows are split over torch's intra-op threads. Inputs may be float32, bfloat16 or float16.

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/python.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec_exp.h"  // vattn/csrc/: e^x, 16 or 8 lanes (also immintrin.h)

namespace {

constexpr int64_t GRAIN = 16;  // rows per parallel chunk

template <typename T>
inline float f(T x) { return static_cast<float>(x); }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-d [rows, dim] with a contiguous last axis, got ",
                    t.sizes(), " with strides ", t.strides());
}

template <typename T>
void rms_rows(T* out, int64_t out_stride, const T* x, int64_t x_stride, const T* w, int64_t rows, int64_t dim,
              float eps) {
  at::parallel_for(0, rows, GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * x_stride;
      float ss = 0.f;
      for (int64_t d = 0; d < dim; ++d) ss += f(xr[d]) * f(xr[d]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
      T* o = out + r * out_stride;
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(f(w[d]) * f(static_cast<T>(f(xr[d]) * inv)));
    }
  });
}

void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK_VALUE(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "out must match x: ",
                    out.sizes(), " vs ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
                    "weight must be 1-d [", x.size(1), "] of x's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(out.data_ptr<scalar_t>(), out.stride(0), x.data_ptr<scalar_t>(), x.stride(0),
                       w.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps));
  });
}

void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
                    "residual must match x: ", residual.sizes(), " vs ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
                    "weight must be 1-d [", x.size(1), "] of x's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const int64_t rows = x.size(0), dim = x.size(1), xs = x.stride(0), rs = residual.stride(0);
    at::parallel_for(0, rows, GRAIN, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t d = 0; d < dim; ++d) rp[r * rs + d] = static_cast<scalar_t>(f(rp[r * rs + d]) + f(xp[r * xs + d]));
      }
      rms_rows<scalar_t>(xp + r0 * xs, xs, rp + r0 * rs, rs, w.data_ptr<scalar_t>(), r1 - r0, dim,
                         static_cast<float>(eps));
    });
  });
}

void rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1,
                    "x must be a CPU [T, heads, head_dim] tensor with a contiguous last axis, got ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK_VALUE(D % 2 == 0, "head_dim must be even, got ", D);
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == T && t->size(1) == D && t->is_contiguous() &&
                      t->scalar_type() == x.scalar_type(), "cos and sin must be contiguous [T = ", T, ", ", D,
                      "] of x's dtype, got ", t->sizes());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    const int64_t ts = x.stride(0), hs = x.stride(1);
    at::parallel_for(0, T, GRAIN, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* c = cp + t * D;
        const scalar_t* s = sp + t * D;
        for (int64_t h = 0; h < H; ++h) {
          scalar_t* v = xp + t * ts + h * hs;
          for (int64_t d = 0; d < half; ++d) {
            const float a = f(v[d]), b = f(v[d + half]);
            // x * cos + rotate_half(x) * sin, each product rounded to dtype as torch does: rotate_half = (-b, a)
            const scalar_t lo = static_cast<scalar_t>(f(static_cast<scalar_t>(a * f(c[d]))) +
                                                      f(static_cast<scalar_t>(-b * f(s[d]))));
            const scalar_t hi = static_cast<scalar_t>(f(static_cast<scalar_t>(b * f(c[d + half]))) +
                                                      f(static_cast<scalar_t>(a * f(s[d + half]))));
            v[d] = lo;
            v[d + half] = hi;
          }
        }
      }
    });
  });
}

#if defined(__AVX512F__)
// e^x for any float32 x: clamped to [-87.3, 88] first (the results there are 0-ish and 1.6e38, which the sigmoid
// below turns into 1 and 0 as the exact ones would).
inline __m512 exp16(__m512 x) {
  return vattn::exp16(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.f)));
}

// silu(g) * u = g * u / (1 + e^-g), NaN in, NaN out.
inline __m512 silu_mul16(__m512 g, __m512 u) {
  const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
  return _mm512_mul_ps(_mm512_div_ps(g, den), u);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// The same, eight lanes (AVX2 machines: without it the loop below calls libm's expf once per element).
inline __m256 exp8(__m256 x) {
  return vattn::exp8(_mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.f)));
}

inline __m256 silu_mul8(__m256 g, __m256 u) {
  const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
  return _mm256_mul_ps(_mm256_div_ps(g, den), u);
}
#endif

// out[t, j] = silu(x[t, j]) * x[t, I + j] for float32 x [T, 2I] (the fused gate|up projection's output): one pass
// where torch's silu and mul take two, with a temporary between them.
void silu_mul(torch::Tensor out, torch::Tensor x) {
  check_rows(x, "x");
  check_rows(out, "out");
  const int64_t T = x.size(0), I = out.size(1);
  TORCH_CHECK_VALUE(x.scalar_type() == torch::kFloat && out.scalar_type() == torch::kFloat,
                    "silu_mul takes float32 tensors");
  TORCH_CHECK_VALUE(out.size(0) == T && x.size(1) == 2 * I, "out must be [T, I] for x [T, 2I], got out ", out.sizes(),
                    " x ", x.sizes());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  at::parallel_for(0, T, GRAIN, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = xp + t * xs;
      const float* u = g + I;
      float* o = op + t * os;
      int64_t j = 0;
#if defined(__AVX512F__)
      for (; j + 16 <= I; j += 16) _mm512_storeu_ps(o + j, silu_mul16(_mm512_loadu_ps(g + j), _mm512_loadu_ps(u + j)));
      if (j < I) {
        const __mmask16 m = static_cast<__mmask16>((1u << (I - j)) - 1);
        _mm512_mask_storeu_ps(o + j, m, silu_mul16(_mm512_maskz_loadu_ps(m, g + j), _mm512_maskz_loadu_ps(m, u + j)));
        j = I;
      }
#elif defined(__AVX2__) && defined(__FMA__)
      for (; j + 8 <= I; j += 8) _mm256_storeu_ps(o + j, silu_mul8(_mm256_loadu_ps(g + j), _mm256_loadu_ps(u + j)));
#endif
      for (; j < I; ++j) o[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
    }
  });
}

// argmax of each row of a float32 [rows, V] matrix, as torch.argmax(dim=1) defines it: the first index of the largest
// value, a NaN counting as larger than everything (so the first NaN wins). torch's own takes ~3 ns per element on
// one thread, a millisecond per step for 128 rows of a 3k vocabulary; this takes two vector passes over each row.
int64_t row_argmax(const float* x, int64_t n) {
  int64_t c = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 v = _mm512_loadu_ps(x + c);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  float best = _mm512_reduce_max_ps(m);
  bool has_nan = nan != 0;
#elif defined(__AVX2__)
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), nan = _mm256_setzero_ps();
  for (; c + 8 <= n; c += 8) {
    const __m256 v = _mm256_loadu_ps(x + c);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, v);  // (a NaN spoils m, but then `best` goes unused)
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float best = _mm_cvtss_f32(h);
  bool has_nan = _mm256_movemask_ps(nan) != 0;
#else
  float best = -std::numeric_limits<float>::infinity();
  bool has_nan = false;
#endif
  for (; c < n; ++c) {
    has_nan |= std::isnan(x[c]);
    best = x[c] > best ? x[c] : best;
  }
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vb = _mm512_set1_ps(best);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 hit = has_nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, vb, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
#elif defined(__AVX2__)
  const __m256 vb = _mm256_set1_ps(best);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const int hit = _mm256_movemask_ps(has_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, vb, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
#endif
  for (; i < n; ++i) {
    if (has_nan ? std::isnan(x[i]) : x[i] == best) return i;
  }
  return 0;  // n == 0 is refused by the caller
}

void argmax(torch::Tensor out, torch::Tensor x) {
  check_rows(x, "x");
  TORCH_CHECK_VALUE(x.scalar_type() == torch::kFloat && x.size(1) > 0, "x must be float32 with at least one column");
  TORCH_CHECK_VALUE(out.dim() == 1 && out.size(0) == x.size(0) && out.scalar_type() == torch::kLong &&
                        out.is_contiguous(), "out must be int64 [", x.size(0), "]");
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t n = x.size(1), stride = x.stride(0);
  at::parallel_for(0, x.size(0), GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = row_argmax(xp + r * stride, n);
  });
}

// MKL's packed GEMM: the weight's panels laid out once for the GEMM kernel instead of on every call, which is what
// a plain sgemm spends a sizeable share of its time on when the activation has few rows (a decode batch). The
// routines live in the MKL that torch's x86 CPU build links in; declared weak, they resolve to null on a torch
// without them, and packed_gemm_available() says so. LP64 interface (MKL_INT is int); CBLAS enum values.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}
constexpr int ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, PACKED = 151, B_MATRIX = 162;
constexpr int64_t PACK_ROWS_HINT = 128;  // m for pack_get_size / pack: the layout does not depend on it

bool packed_gemm_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

void check_int32(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v <= std::numeric_limits<int>::max(), what, " (", v, ") exceeds MKL's 32-bit index");
}

torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(packed_gemm_available(), "MKL's packed GEMM is not in this torch build");
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
                    "weight must be a contiguous float32 CPU [out, in] tensor, got ", w.scalar_type(), " ",
                    w.sizes(), " on ", w.device());
  const int64_t n = w.size(0), k = w.size(1);
  check_int32(n, "out_features");
  check_int32(k, "in_features");
  TORCH_CHECK_VALUE(n > 0 && k > 0, "weight must not be empty, got ", w.sizes());
  const size_t bytes = cblas_sgemm_pack_get_size(B_MATRIX, PACK_ROWS_HINT, n, k);
  auto packed = torch::empty({static_cast<int64_t>((bytes + 3) / 4)}, w.options());  // 64-byte aligned by torch
  // B = w.T ([K, N]) from w stored [N, K] row-major: transposed, leading dimension K
  cblas_sgemm_pack(ROW_MAJOR, B_MATRIX, TRANS, PACK_ROWS_HINT, n, k, 1.0f, w.data_ptr<float>(), k,
                   packed.data_ptr<float>());
  return packed;
}

void packed_linear(torch::Tensor out, torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(packed_gemm_available(), "MKL's packed GEMM is not in this torch build");
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                    packed.scalar_type() == at::kFloat, "packed_linear takes float32 tensors");
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1);
  TORCH_CHECK_VALUE(out.size(0) == m, "out has ", out.size(0), " rows, x has ", m);
  check_int32(m, "rows");
  check_int32(x.stride(0), "x's row stride");
  check_int32(out.stride(0), "out's row stride");
  TORCH_CHECK_VALUE(static_cast<size_t>(packed.numel()) * 4 >= cblas_sgemm_pack_get_size(B_MATRIX, PACK_ROWS_HINT, n, k),
                    "packed weight is too small for [", n, ", ", k, "]: packed for another shape");
  if (m == 0) return;
  float beta = 0.0f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat,
                      "bias must be float32 [", n, "], got ", bias->sizes());
    out.copy_(bias->unsqueeze(0).expand({m, n}));
    beta = 1.0f;
  }
  cblas_sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, m, n, k, x.data_ptr<float>(), x.stride(0),
                      packed.data_ptr<float>(), k, beta, out.data_ptr<float>(), out.stride(0));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The calls compute without the interpreter lock (they touch no Python object), so another Python thread, such
  // as the KV cache's page-mapping helper, runs meanwhile instead of taking turns with the step.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("rms_norm", &rms_norm, nogil, "out = RMSNorm(x) * weight", py::arg("out"), py::arg("x"), py::arg("weight"),
        py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, nogil, "residual += x; x = RMSNorm(residual) * weight (in place)", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("silu_mul", &silu_mul, nogil, "out = silu(x[:, :I]) * x[:, I:] (float32)", py::arg("out"), py::arg("x"));
  m.def("argmax", &argmax, nogil, "argmax of each row (first index of the max; NaN wins)", py::arg("out"), py::arg("x"));
  m.def("packed_gemm_available", &packed_gemm_available, "whether MKL's packed GEMM routines are linked in");
  m.def("pack_weight", &pack_weight, nogil, "a float32 [out, in] weight in MKL's packed GEMM layout", py::arg("weight"));
  m.def("packed_linear", &packed_linear, nogil, "out = x @ weight.T (+ bias) against a packed weight", py::arg("out"),
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none());
  m.def("rope", &rope, nogil, "rotate-half rotary embedding, in place", py::arg("x"), py::arg("cos"), py::arg("sin"));
}

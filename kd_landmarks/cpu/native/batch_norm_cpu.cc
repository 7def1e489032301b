// Training-mode BatchNorm reductions for XLA's CPU backend, called from JAX through the XLA FFI.
//
// BatchNorm in training reduces every activation twice per step: the batch moments in the forward pass,
// and sum(dz), sum(dz * xhat) in the backward pass (dz = dy * act'(z); layers.batch_norm_act_train).
// XLA's CPU backend runs each reduction as its own pass, and in the backward pass first materialises
// dz and xhat as full tensors (about 30 ms for one [8, 112, 112, 96] layer on one core). These loops
// make one pass over x (forward) or over (dy, x) (backward), recomputing the activation's mask and
// xhat on the fly.
//
// Operands are [N, C] row-major (NHWC flattened over N, H, W), float32. Each row is added into
// per-channel float32 accumulators that stay in L1; every kFlushRows rows they are added into float64
// totals, so the rounding error does not grow with N (10^5 rows per channel in MobileNetV2).
// Rows are split into contiguous ranges on XLA's intra-op thread pool; the partial totals are summed
// in a fixed order, so results do not depend on scheduling.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace {

using namespace kd_landmarks;  // v8, v8i, Load, Store, ParallelFor, ReduceRanges, ffi

constexpr int64_t kFlushRows = 64;
constexpr int64_t kMinRowsPerThread = 1024;

// Activations whose derivative the backward kernel recomputes; codes match native/__init__.py.
enum Activation : int64_t { kIdentity = 0, kRelu6 = 1, kSwish = 2 };

// exp(x) for 8 lanes: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, then Cephes' degree-7
// polynomial for e^r (relative error about 1e-7, as expf), scaled by 2^n through the exponent bits.
// Inputs are clamped to [-87.3, 88], where n stays in [-126, 127] and 2^n a normal float (at 88.7, n
// would be 128: the exponent field of infinity).
inline v8 Exp(v8 x) {
  const v8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
  x = x < zero + 88.0f ? x : zero + 88.0f;
  x = x > zero - 87.3f ? x : zero - 87.3f;
  const v8 scaled = x * 1.44269504088896341f + 0.5f;
  v8i n = __builtin_convertvector(scaled, v8i);              // truncates toward zero ...
  n -= (v8i)(__builtin_convertvector(n, v8) > scaled) & 1;   // ... so step down where that rounded up
  const v8 fn = __builtin_convertvector(n, v8);
  const v8 r = x - fn * 0.693359375f - fn * -2.12194440e-4f;  // ln2 split in two for exactness
  v8 p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v8i two_n = (n + 127) << 23;
  return p * (v8)two_n;
}

// swish'(z) = s * (1 + z * (1 - s)) with s = sigmoid(z) = 1 / (1 + exp(-z)).
inline v8 SwishDerivative(v8 z) {
  const v8 s = 1.0f / (1.0f + Exp(-z));
  return s * (1.0f + z * (1.0f - s));
}

inline float SwishDerivative(float z) {
  const float s = 1.0f / (1.0f + std::exp(-z));
  return s * (1.0f + z * (1.0f - s));
}

// Adds the float32 accumulators into the float64 totals and clears them.
inline void Flush(float* acc, double* total, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    total[i] += acc[i];
    acc[i] = 0.0f;
  }
}

// total[0:C] += sum_r x[r, c]; total[C:2C] += sum_r x[r, c]^2, over rows [r0, r1).
void MomentsRows(const float* x, int64_t C, int64_t r0, int64_t r1, double* total) {
  std::vector<float> acc(2 * C, 0.0f);
  float* sum = acc.data();
  float* sum_sq = sum + C;
  const int64_t vec_end = C - C % kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = x + r * C;
    for (int64_t c = 0; c < vec_end; c += kLanes) {
      const v8 v = Load(row + c);
      Store(sum + c, Load(sum + c) + v);
      Store(sum_sq + c, Load(sum_sq + c) + v * v);
    }
    for (int64_t c = vec_end; c < C; ++c) {
      sum[c] += row[c];
      sum_sq[c] += row[c] * row[c];
    }
    if ((r - r0) % kFlushRows == kFlushRows - 1 || r == r1 - 1) Flush(acc.data(), total, 2 * C);
  }
}

// With z = x * a + b (a = scale / sqrt(var + eps), b = bias - mean * a), xhat = (x - mean) * inv and
// dz = dy * act'(z): total[0:C] += sum_r dz, total[C:2C] += sum_r dz * xhat, over rows [r0, r1).
// act'(z) of relu6 is 1 on (0, 6) and 0 elsewhere, the kinks included (as jax.nn.relu6); swish's is
// computed from the sigmoid (SwishDerivative).
void GradSumsRows(const float* dy, const float* x, const float* a, const float* b, const float* mean,
                  const float* inv, int64_t C, int64_t activation, int64_t r0, int64_t r1, double* total) {
  std::vector<float> acc(2 * C, 0.0f);
  float* sum_dz = acc.data();
  float* sum_dz_xhat = sum_dz + C;
  const int64_t vec_end = C - C % kLanes;
  const v8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
  const v8 six = zero + 6.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x_row = x + r * C;
    const float* dy_row = dy + r * C;
    for (int64_t c = 0; c < vec_end; c += kLanes) {
      const v8 xv = Load(x_row + c);
      v8 dz = Load(dy_row + c);
      if (activation == kRelu6) {
        const v8 z = xv * Load(a + c) + Load(b + c);
        dz = (v8)((v8i)dz & ((z > zero) & (z < six)));
      } else if (activation == kSwish) {
        dz *= SwishDerivative(xv * Load(a + c) + Load(b + c));
      }
      const v8 xhat = (xv - Load(mean + c)) * Load(inv + c);
      Store(sum_dz + c, Load(sum_dz + c) + dz);
      Store(sum_dz_xhat + c, Load(sum_dz_xhat + c) + dz * xhat);
    }
    for (int64_t c = vec_end; c < C; ++c) {
      float dz = dy_row[c];
      if (activation == kRelu6) {
        const float z = x_row[c] * a[c] + b[c];
        if (!(z > 0.0f && z < 6.0f)) dz = 0.0f;
      } else if (activation == kSwish) {
        dz *= SwishDerivative(x_row[c] * a[c] + b[c]);
      }
      sum_dz[c] += dz;
      sum_dz_xhat[c] += dz * ((x_row[c] - mean[c]) * inv[c]);
    }
    if ((r - r0) % kFlushRows == kFlushRows - 1 || r == r1 - 1) Flush(acc.data(), total, 2 * C);
  }
}

// Rows [0, N) in contiguous ranges, one per thread (at least kMinRowsPerThread each), each into 2*C float64
// totals, summed in range order.
template <typename F>
std::vector<double> ReduceRows(ffi::ThreadPool& pool, int64_t N, int64_t C, F rows_fn) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), N / kMinRowsPerThread));
  return ReduceRanges<double>(pool, N, chunks, 2 * C, rows_fn);
}

ffi::Error InvalidArgument(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "kd_landmarks batch norm kernel: " + message);
}

// x [N, C] -> [2, C]: (mean, E[x^2] - mean^2), computed in float64. The variance can come out <= 0 for
// a constant channel; the caller clips it at 0 as flax's BatchNorm does.
ffi::Error MomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  if (x.dimensions().size() != 2) return InvalidArgument("moments take x of rank 2 [N, C]");
  const int64_t N = x.dimensions()[0], C = x.dimensions()[1];
  if (N == 0) return InvalidArgument("moments of zero rows");
  const float* xd = x.typed_data();
  const std::vector<double> sums =
      ReduceRows(pool, N, C, [&](int64_t r0, int64_t r1, double* t) { MomentsRows(xd, C, r0, r1, t); });
  float* result = out->typed_data();
  for (int64_t c = 0; c < C; ++c) {
    const double mean = sums[c] / N;
    result[c] = static_cast<float>(mean);
    result[C + c] = static_cast<float>(sums[C + c] / N - mean * mean);
  }
  return ffi::Error::Success();
}

// dy, x [N, C]; stats [4, C] = (a, b, mean, inv) as in GradSumsRows -> [2, C]: (sum dz, sum dz * xhat).
ffi::Error GradSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> stats, ffi::ResultBuffer<ffi::F32> out, int64_t activation) {
  if (x.dimensions().size() != 2) return InvalidArgument("gradient sums take x of rank 2 [N, C]");
  const int64_t N = x.dimensions()[0], C = x.dimensions()[1];
  if (dy.dimensions().size() != 2 || dy.dimensions()[0] != N || dy.dimensions()[1] != C) {
    return InvalidArgument("dy must have x's shape [N, C]");
  }
  if (stats.dimensions().size() != 2 || stats.dimensions()[0] != 4 || stats.dimensions()[1] != C) {
    return InvalidArgument("stats must be [4, C] (a, b, mean, inv)");
  }
  if (activation != kIdentity && activation != kRelu6 && activation != kSwish) {
    return InvalidArgument("activation code must be 0 (identity), 1 (relu6) or 2 (swish)");
  }
  const float* xd = x.typed_data();
  const float* dyd = dy.typed_data();
  const float* s = stats.typed_data();
  const std::vector<double> sums = ReduceRows(pool, N, C, [&](int64_t r0, int64_t r1, double* t) {
    GradSumsRows(dyd, xd, s, s + C, s + 2 * C, s + 3 * C, C, activation, r0, r1, t);
  });
  float* result = out->typed_data();
  for (int64_t i = 0; i < 2 * C; ++i) result[i] = static_cast<float>(sums[i]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdBatchNormMoments, MomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdBatchNormGradSums, GradSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("activation"));

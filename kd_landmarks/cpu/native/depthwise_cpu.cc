// The depthwise-convolution weight gradient for XLA's CPU backend, called from JAX through the XLA FFI.
//
// XLA's CPU backend computes the depthwise weight gradient of a k x k filter as k*k separate passes
// over the activation and the output gradient (one per tap; see depthwise.py), which is memory-bound:
// about 100 ms of MobileNetV2's 224 px train step at batch 8 on one core. These loops make one pass:
// for each output row they keep the input rows the row needs in cache and accumulate all k*k taps.
//
// Layouts are the ones of kd_landmarks.models.depthwise: NHWC activations, kernel [kh, kw, 1, C],
// TensorFlow SAME padding given as (pad_top, pad_left); the padded zeros are skipped, never read.
// float32 only; channels are processed 8 at a time with vector extensions (common.h), the remainder
// lane by lane.
// Channels are split into disjoint ranges run on XLA's intra-op thread pool (one range per thread).
//
// Small images (the demo's 4-32 px layers; EfficientNet's and MobileNetV2's 7-14 px ones at 224 px) take another
// loop order: there a row holds a few pixels, and the per-row loop above spends its time starting rows and
// adding each row's sums into the output (0.57 ms for [32, 16, 16, 72], 9 GMAC/s). Per image and group of 8
// channels, SmallImageWeightGradient keeps all k*k tap sums in registers over the whole image and adds them
// to a per-thread total once; images are shared out over the threads. It re-reads an image once per channel
// group, so it is chosen only where an image fits in L2 (kSmallImageBytes; benchmarks/depthwise_gradient.py).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace kd_landmarks;  // v8, Load, Store, ParallelFor, ReduceRanges, ffi

struct Geometry {
  int64_t batch, height, width, channels;  // input x
  int64_t out_height, out_width;           // output of the forward convolution
  int64_t kh, kw, stride, pad_top, pad_left;

  // The output columns ow for which input column stride*ow + j - pad_left lies inside [0, width).
  void ValidColumns(int64_t j, int64_t* lo, int64_t* hi) const {
    // stride*ow + j - pad_left >= 0  <=>  ow >= ceil((pad_left - j) / stride)
    int64_t first = pad_left - j;
    *lo = first <= 0 ? 0 : (first + stride - 1) / stride;
    // stride*ow + j - pad_left <= width - 1  <=>  ow <= floor((width - 1 + pad_left - j) / stride)
    int64_t last = width - 1 + pad_left - j;
    *hi = last < 0 ? 0 : std::min(out_width, last / stride + 1);
    if (*hi < *lo) *hi = *lo;
  }
};

ffi::Error CheckShapes(const Geometry& geo) {
  int64_t expect_h = (geo.height + geo.stride - 1) / geo.stride;
  int64_t expect_w = (geo.width + geo.stride - 1) / geo.stride;
  if (geo.out_height != expect_h || geo.out_width != expect_w) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "depthwise weight gradient: output gradient must be [B, ceil(H/s), ceil(W/s), C]");
  }
  if (geo.stride < 1 || geo.kh < 1 || geo.kw < 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "depthwise weight gradient: bad stride or kernel size");
  }
  return ffi::Error::Success();
}

// grad_kernel[i, j, c] = sum_{b, oh, ow} grad_out[b, oh, ow, c] * x[b, s*oh + i - pt, s*ow + j - pl, c],
// for the channels c in [c_begin, c_end) (disjoint ranges can run on different threads).
void WeightGradient(const Geometry& geo, const float* x, const float* grad_out, float* grad_kernel,
                    int64_t c_begin, int64_t c_end) {
  const int64_t C = geo.channels;
  const int64_t vec_end = c_end - (c_end - c_begin) % kLanes;
  for (int64_t t = 0; t < geo.kh * geo.kw; ++t) {
    std::fill(grad_kernel + t * C + c_begin, grad_kernel + t * C + c_end, 0.0f);
  }
  for (int64_t b = 0; b < geo.batch; ++b) {
    for (int64_t oh = 0; oh < geo.out_height; ++oh) {
      const float* g_row = grad_out + ((b * geo.out_height + oh) * geo.out_width) * C;
      for (int64_t i = 0; i < geo.kh; ++i) {
        const int64_t ih = geo.stride * oh + i - geo.pad_top;
        if (ih < 0 || ih >= geo.height) continue;
        const float* x_row = x + ((b * geo.height + ih) * geo.width) * C;
        for (int64_t j = 0; j < geo.kw; ++j) {
          int64_t lo, hi;
          geo.ValidColumns(j, &lo, &hi);
          float* out = grad_kernel + (i * geo.kw + j) * C;
          const int64_t x_step = geo.stride * C;
          const float* x_first = x_row + (geo.stride * lo + j - geo.pad_left) * C;
          // One register accumulator per group of 8 channels over the whole row: the row sum is
          // added to the float32 total once, which also keeps the rounding error per row small.
          // Four independent accumulators: a single chain would wait on each add's latency.
          const int64_t count = hi - lo;
          const int64_t unrolled = count - count % 4;
          for (int64_t c = c_begin; c < vec_end; c += kLanes) {
            v8 acc0 = {0, 0, 0, 0, 0, 0, 0, 0}, acc1 = acc0, acc2 = acc0, acc3 = acc0;
            const float* gp = g_row + lo * C + c;
            const float* xp = x_first + c;
            int64_t n = 0;
            for (; n < unrolled; n += 4, gp += 4 * C, xp += 4 * x_step) {
              acc0 += Load(gp) * Load(xp);
              acc1 += Load(gp + C) * Load(xp + x_step);
              acc2 += Load(gp + 2 * C) * Load(xp + 2 * x_step);
              acc3 += Load(gp + 3 * C) * Load(xp + 3 * x_step);
            }
            for (; n < count; ++n, gp += C, xp += x_step) acc0 += Load(gp) * Load(xp);
            Store(out + c, Load(out + c) + ((acc0 + acc1) + (acc2 + acc3)));
          }
          for (int64_t c = vec_end; c < c_end; ++c) {
            float acc = 0.0f;
            for (int64_t ow = lo; ow < hi; ++ow) acc += g_row[ow * C + c] * x_first[(ow - lo) * x_step + c];
            out[c] += acc;
          }
        }
      }
    }
  }
}


// x and grad_out bytes of one image up to which the register-blocked loop is used (method 0). Measured on the
// README's Xeon (2 MB L2 per core), 2 threads, per-row time over register-blocked time
// (benchmarks/depthwise_gradient.py): 2.1-4.2x on the demo's layers (24-240 KB), 1.1-1.7x at 0.4-2.2 MB
// (MobileNetV2's and EfficientNet's 7-56 px layers at 224 px), 1.02x at 3.1 MB and 0.67x at 5.9 MB (112 px).
// Not measured on a CPU with a smaller L2 (an AMD EPYC's is 512 KB).
constexpr int64_t kSmallImageBytes = 5 << 19;  // 2.5 MB

// grad_kernel partial sums [K*K, C] over the images [b_begin, b_end), all channels (kh = kw = K).
template <int K>
void SmallImageWeightGradient(const Geometry& geo, const float* x, const float* grad_out, float* partial,
                              int64_t b_begin, int64_t b_end) {
  const int64_t C = geo.channels;
  const int64_t vec_end = C - C % kLanes;
  // Output columns whose K input columns all lie inside the image (no check needed there).
  int64_t inner_lo = 0, inner_hi = geo.out_width;
  for (int64_t j = 0; j < K; ++j) {
    int64_t lo, hi;
    geo.ValidColumns(j, &lo, &hi);
    inner_lo = std::max(inner_lo, lo);
    inner_hi = std::min(inner_hi, hi);
  }
  if (inner_hi < inner_lo) inner_hi = inner_lo;
  for (int64_t b = b_begin; b < b_end; ++b) {
    const float* xb = x + b * geo.height * geo.width * C;
    const float* gb = grad_out + b * geo.out_height * geo.out_width * C;
    for (int64_t c = 0; c < vec_end; c += kLanes) {
      v8 acc[K * K];
#pragma GCC unroll 25
      for (int t = 0; t < K * K; ++t) acc[t] = v8{0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t oh = 0; oh < geo.out_height; ++oh) {
        const int64_t ih0 = geo.stride * oh - geo.pad_top;
        const float* g_row = gb + oh * geo.out_width * C + c;
        for (int64_t ow = 0; ow < geo.out_width; ++ow) {
          const v8 g = Load(g_row + ow * C);
          const int64_t iw0 = geo.stride * ow - geo.pad_left;
          const bool inner = ow >= inner_lo && ow < inner_hi;
#pragma GCC unroll 5
          for (int i = 0; i < K; ++i) {
            const int64_t ih = ih0 + i;
            if (ih < 0 || ih >= geo.height) continue;
            const float* x_row = xb + ih * geo.width * C + c;
            if (inner) {
#pragma GCC unroll 5
              for (int j = 0; j < K; ++j) acc[i * K + j] += g * Load(x_row + (iw0 + j) * C);
            } else {
#pragma GCC unroll 5
              for (int j = 0; j < K; ++j) {
                const int64_t iw = iw0 + j;
                if (iw >= 0 && iw < geo.width) acc[i * K + j] += g * Load(x_row + iw * C);
              }
            }
          }
        }
      }
#pragma GCC unroll 25
      for (int t = 0; t < K * K; ++t) Store(partial + t * C + c, Load(partial + t * C + c) + acc[t]);
    }
    // The remaining channels (C % 8) lane by lane.
    for (int64_t c = vec_end; c < C; ++c) {
      for (int64_t oh = 0; oh < geo.out_height; ++oh) {
        for (int64_t ow = 0; ow < geo.out_width; ++ow) {
          const float g = gb[(oh * geo.out_width + ow) * C + c];
          for (int i = 0; i < K; ++i) {
            const int64_t ih = geo.stride * oh - geo.pad_top + i;
            if (ih < 0 || ih >= geo.height) continue;
            for (int j = 0; j < K; ++j) {
              const int64_t iw = geo.stride * ow - geo.pad_left + j;
              if (iw >= 0 && iw < geo.width) partial[(i * K + j) * C + c] += g * xb[(ih * geo.width + iw) * C + c];
            }
          }
        }
      }
    }
  }
}

// Images shared out over the threads, each summing into its own [K*K, C] total; the totals are added at the end.
template <int K>
void SmallImageWeightGradientParallel(ffi::ThreadPool& pool, const Geometry& geo, const float* x,
                                      const float* grad_out, float* out) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(geo.batch, pool.num_threads()));
  const std::vector<float> totals = ReduceRanges<float>(
      pool, geo.batch, chunks, K * K * geo.channels,
      [&](int64_t b0, int64_t b1, float* partial) { SmallImageWeightGradient<K>(geo, x, grad_out, partial, b0, b1); });
  std::copy(totals.begin(), totals.end(), out);
}

Geometry MakeGeometry(ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> g_dims, int64_t stride,
                      int64_t kh, int64_t kw, int64_t pad_top, int64_t pad_left) {
  return Geometry{x_dims[0], x_dims[1], x_dims[2], x_dims[3], g_dims[1], g_dims[2],
                  kh, kw, stride, pad_top, pad_left};
}

// method: 0 chooses by image size, 1 the per-row loop, 2 the register-blocked small-image loop (3x3 and 5x5).
ffi::Error WeightGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> grad_out,
                              ffi::ResultBuffer<ffi::F32> grad_kernel, int64_t stride, int64_t kh,
                              int64_t kw, int64_t pad_top, int64_t pad_left, int64_t method) {
  if (x.dimensions().size() != 4 || grad_out.dimensions().size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "depthwise weight gradient: NHWC operands expected");
  }
  Geometry geo = MakeGeometry(x.dimensions(), grad_out.dimensions(), stride, kh, kw, pad_top, pad_left);
  if (ffi::Error error = CheckShapes(geo); error.failure()) return error;
  if (method < 0 || method > 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "depthwise weight gradient: method must be 0, 1 or 2");
  }
  const bool small_kernel = kh == kw && (kh == 3 || kh == 5);
  const int64_t image_bytes = (geo.height * geo.width + geo.out_height * geo.out_width) * geo.channels * 4;
  if (method == 2 && !small_kernel) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "depthwise weight gradient: method 2 needs a 3x3 or 5x5 kernel");
  }
  if (method == 2 || (method == 0 && small_kernel && image_bytes <= kSmallImageBytes)) {
    if (kh == 3) {
      SmallImageWeightGradientParallel<3>(pool, geo, x.typed_data(), grad_out.typed_data(), grad_kernel->typed_data());
    } else {
      SmallImageWeightGradientParallel<5>(pool, geo, x.typed_data(), grad_out.typed_data(), grad_kernel->typed_data());
    }
    return ffi::Error::Success();
  }
  // Disjoint channel ranges, whole groups of 8 lanes, one per thread (the last takes the remainder).
  const int64_t groups = (geo.channels + kLanes - 1) / kLanes;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(groups, pool.num_threads()));
  const float* xd = x.typed_data();
  const float* gd = grad_out.typed_data();
  float* out = grad_kernel->typed_data();
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t c_begin = std::min(geo.channels, groups * chunk / chunks * kLanes);
    const int64_t c_end = std::min(geo.channels, groups * (chunk + 1) / chunks * kLanes);
    if (c_begin < c_end) WeightGradient(geo, xd, gd, out, c_begin, c_end);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdDepthwiseWeightGradient, WeightGradientImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("method"));

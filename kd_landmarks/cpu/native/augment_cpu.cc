// The augmentation's two costly parts for XLA's CPU backend, through the XLA FFI: the bilinear affine warp of
// uint8 crops and the additive Gaussian noise.
//
// Warp.
// kd_landmarks.augment.warp_image samples each output pixel from four taps of the stored crop. Written in
// jax.numpy that is four gathers of [out*out, C] rows per image, which XLA's CPU backend runs element by element
// with index arithmetic in between: 5.8 ms of the demo's 25 ms train step (32 crops, 96 -> 64 px). This loop
// computes the same sum per pixel, reading the uint8 taps directly.
//
// Operands: images uint8 [..., H, W, C], affines float32 [..., 2, 3] (the same leading dimensions; the affine
// maps an output pixel (qx, qy) to the input pixel x = a00*qx + a01*qy + a02, y = a10*qx + a11*qy + a12, pixel
// centres on integers). Result float32 [..., out, out, C] in [0, 1]: the bilinear value / 255. Taps outside
// the image read fill_value (already in 0..255) with fill_mode 0 ('constant'); fill_mode 1 ('nearest') clamps
// the sampling point into the image first. Arithmetic in float32 in the order of augment._sample_gather.
// Rows of output (image, row) are shared out over XLA's intra-op thread pool.
#include <array>
#include <cmath>
#include <cstdint>

#include "common.h"

namespace {

using namespace kd_landmarks;  // ParallelFor, ffi

ffi::Error WarpImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> images, ffi::Buffer<ffi::F32> affines,
                    ffi::ResultBuffer<ffi::F32> out, int64_t fill_mode, float fill_value) {
  const auto in_dims = images.dimensions();
  const auto affine_dims = affines.dimensions();
  const auto out_dims = out->dimensions();
  const size_t rank = in_dims.size();
  if (rank < 3 || affine_dims.size() != rank - 1 || out_dims.size() != rank ||
      affine_dims[rank - 3] != 2 || affine_dims[rank - 2] != 3 || out_dims[rank - 1] != in_dims[rank - 1]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "affine warp: images [..., H, W, C], affines [..., 2, 3] and out [..., out, out, C] expected");
  }
  int64_t count = 1;
  for (size_t d = 0; d + 3 < rank; ++d) {
    if (in_dims[d] != affine_dims[d] || in_dims[d] != out_dims[d]) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "affine warp: leading dimensions differ");
    }
    count *= in_dims[d];
  }
  if (fill_mode != 0 && fill_mode != 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "affine warp: fill_mode must be 0 or 1");
  }
  const int64_t height = in_dims[rank - 3], width = in_dims[rank - 2], channels = in_dims[rank - 1];
  const int64_t out_h = out_dims[rank - 3], out_w = out_dims[rank - 2];
  const uint8_t* src = images.typed_data();
  const float* aff = affines.typed_data();
  float* dst = out->typed_data();
  const bool nearest = fill_mode == 1;
  const int64_t rows = count * out_h;
  // About 8 chunks per thread: rows cost the same, and the caller helps (ParallelFor).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 8 * pool.num_threads()));
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    for (int64_t r = rows * chunk / chunks; r < rows * (chunk + 1) / chunks; ++r) {
      const int64_t n = r / out_h, qy = r % out_h;
      const float* a = aff + n * 6;
      const uint8_t* image = src + n * height * width * channels;
      float* row = dst + r * out_w * channels;
      for (int64_t qx = 0; qx < out_w; ++qx) {
        float x = a[0] * static_cast<float>(qx) + a[1] * static_cast<float>(qy) + a[2];
        float y = a[3] * static_cast<float>(qx) + a[4] * static_cast<float>(qy) + a[5];
        if (nearest) {
          x = std::min(std::max(x, 0.0f), static_cast<float>(width - 1));
          y = std::min(std::max(y, 0.0f), static_cast<float>(height - 1));
        }
        // NaN or far outside: every tap is outside (constant fill); keeps the int conversion defined.
        if (!(std::fabs(x) < 1e8f) || !(std::fabs(y) < 1e8f)) {
          for (int64_t c = 0; c < channels; ++c) row[qx * channels + c] = fill_value * (1.0f / 255.0f);
          continue;
        }
        const float fx = std::floor(x), fy = std::floor(y);
        const float wx = x - fx, wy = y - fy;
        const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
        const bool in_x0 = x0 >= 0 && x0 < width, in_x1 = x0 + 1 >= 0 && x0 + 1 < width;
        const bool in_y0 = y0 >= 0 && y0 < height, in_y1 = y0 + 1 >= 0 && y0 + 1 < height;
        // Offsets of the four taps (only those inside the image are read).
        const int64_t o00 = (y0 * width + x0) * channels, o01 = o00 + channels;
        const int64_t o10 = o00 + width * channels, o11 = o10 + channels;
        for (int64_t c = 0; c < channels; ++c) {
          const float t00 = in_y0 && in_x0 ? static_cast<float>(image[o00 + c]) : fill_value;
          const float t01 = in_y0 && in_x1 ? static_cast<float>(image[o01 + c]) : fill_value;
          const float t10 = in_y1 && in_x0 ? static_cast<float>(image[o10 + c]) : fill_value;
          const float t11 = in_y1 && in_x1 ? static_cast<float>(image[o11 + c]) : fill_value;
          const float top = (1.0f - wx) * t00 + wx * t01;
          const float bottom = (1.0f - wx) * t10 + wx * t11;
          row[qx * channels + c] = ((1.0f - wy) * top + wy * bottom) / 255.0f;
        }
      }
    }
  });
  return ffi::Error::Success();
}


// Gaussian noise. kd_landmarks.augment draws N(0, 1) samples in jax.numpy from random bits and cos/sin/log: on
// XLA's CPU backend about 2.7 ms of the demo's step (32 x 64 x 64 x 3 samples), whatever the fusion. Here each
// sample is the inverse normal CDF at a 16-bit uniform, u = (k + 0.5) / 2^16, read from a table of the 65,536
// values (tails end at 4.33 sigma, as augment.standard_normal's). The 16-bit k come four at a time from a
// counter-based generator: SplitMix64's output function applied twice, keyed with 128 bits that JAX draws
// from the step's key, and counted by the element's index. So the noise is a pure function of (key, shape).
//
// Operands: images float32 [B, ...] in [0, 1], std float32 [B] (one standard deviation per image), key uint32
// [4]. Result: clip(images + std[b] * z, 0, 1), float32, the shape of images.

// Inverse of the standard normal CDF in double: Acklam's rational approximation (relative error 1.2e-9) and
// one Halley step on erfc, which brings it to about double precision.
double InverseNormalCdf(double p) {
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                             1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01, -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  const double low = 0.02425;
  double x;
  if (p < low) {
    const double q = std::sqrt(-2.0 * std::log(p));
    x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
  } else if (p <= 1.0 - low) {
    const double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0);
  } else {
    const double q = std::sqrt(-2.0 * std::log(1.0 - p));
    x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
  }
  const double e = 0.5 * std::erfc(-x / std::sqrt(2.0)) - p;
  const double u = e * std::sqrt(2.0 * 3.14159265358979323846) * std::exp(x * x / 2.0);
  return x - u / (1.0 + x * u / 2.0);
}

// The 65,536 values, built once (thread-safe static initialisation, about a millisecond).
const std::array<float, 65536>& NormalTable() {
  static const std::array<float, 65536> table = [] {
    std::array<float, 65536> values;
    for (int k = 0; k < 65536; ++k) values[k] = static_cast<float>(InverseNormalCdf((k + 0.5) / 65536.0));
    return values;
  }();
  return table;
}

inline uint64_t Mix64(uint64_t z) {  // SplitMix64's output function
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

ffi::Error NoiseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> images, ffi::Buffer<ffi::F32> stds,
                     ffi::Buffer<ffi::U32> key, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = images.dimensions();
  if (dims.size() == 0 || stds.dimensions().size() != 1 || stds.dimensions()[0] != dims[0] ||
      key.element_count() != 4 || out->element_count() != images.element_count()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "gaussian noise: images [B, ...], std [B] and a uint32 [4] key expected");
  }
  const int64_t batch = dims[0];
  const int64_t per_image = batch > 0 ? images.element_count() / batch : 0;
  const int64_t total = batch * per_image;
  const uint32_t* k = key.typed_data();
  const uint64_t key_lo = (static_cast<uint64_t>(k[0]) << 32) | k[1];
  const uint64_t key_hi = (static_cast<uint64_t>(k[2]) << 32) | k[3];
  const float* src = images.typed_data();
  const float* std_of = stds.typed_data();
  float* dst = out->typed_data();
  const float* table = NormalTable().data();
  // Groups of four elements share one 64-bit draw; chunks are whole groups.
  const int64_t groups = (total + 3) / 4;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(groups / 4096, 4 * pool.num_threads()));
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t g_end = groups * (chunk + 1) / chunks;
    for (int64_t g = groups * chunk / chunks; g < g_end; ++g) {
      const uint64_t bits = Mix64(Mix64(key_lo + (static_cast<uint64_t>(g) + 1) * 0x9e3779b97f4a7c15ULL) ^ key_hi);
      const int64_t end = std::min<int64_t>(4 * g + 4, total);
      for (int64_t e = 4 * g; e < end; ++e) {
        const float z = table[(bits >> (16 * (e - 4 * g))) & 0xFFFF];
        const float v = src[e] + std_of[e / per_image] * z;
        dst[e] = std::min(std::max(v, 0.0f), 1.0f);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdAffineWarp, WarpImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("fill_mode")
                                  .Attr<float>("fill_value"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdGaussianNoise, NoiseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

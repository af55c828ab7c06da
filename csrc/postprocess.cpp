#include "postprocess.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <system_error>
#include <thread>

namespace pyattr {
namespace {

// ---------------------------------------------------------------------------------------------
// Colormaps: (x, y) anchors per channel, from matplotlib's _cm.py segment data (_jet_data,
// _hot_data, _gray_data). All their anchors are continuous (y0 == y1), so one y per anchor.
// pyattr/colormaps.py holds the same numbers.

struct Anchor {
  double x, y;
};

struct ColormapSpec {
  const char* name;
  std::vector<Anchor> rgb[3];
};

const std::vector<ColormapSpec>& colormap_specs() {
  static const std::vector<ColormapSpec> specs = {
      {"jet",
       {{{0.0, 0.0}, {0.35, 0.0}, {0.66, 1.0}, {0.89, 1.0}, {1.0, 0.5}},
        {{0.0, 0.0}, {0.125, 0.0}, {0.375, 1.0}, {0.64, 1.0}, {0.91, 0.0}, {1.0, 0.0}},
        {{0.0, 0.5}, {0.11, 1.0}, {0.34, 1.0}, {0.65, 0.0}, {1.0, 0.0}}}},
      {"hot",
       {{{0.0, 0.0416}, {0.365079, 1.0}, {1.0, 1.0}},
        {{0.0, 0.0}, {0.365079, 0.0}, {0.746032, 1.0}, {1.0, 1.0}},
        {{0.0, 0.0}, {0.746032, 0.0}, {1.0, 1.0}}}},
      {"gray", {{{0.0, 0.0}, {1.0, 1.0}}, {{0.0, 0.0}, {1.0, 1.0}}, {{0.0, 0.0}, {1.0, 1.0}}}},
  };
  return specs;
}

// Linear interpolation on the first segment [x_{k-1}, x_k] with x <= x_k (k >= 1).
double interpolate(const std::vector<Anchor>& a, double x) {
  std::size_t k = 1;
  while (k + 1 < a.size() && a[k].x < x) ++k;
  return a[k - 1].y + (x - a[k - 1].x) / (a[k].x - a[k - 1].x) * (a[k].y - a[k - 1].y);
}

std::uint8_t round_to_uint8(double v) {
  return static_cast<std::uint8_t>(std::clamp(std::floor(v * 255.0 + 0.5), 0.0, 255.0));
}

// ---------------------------------------------------------------------------------------------
// Threading: parallel_for splits [0, count) into one contiguous chunk per thread and calls
// fn(begin, end) on each; the calling thread takes the last chunk. Jobs cheaper than
// kMinWorkPerThread per thread use fewer threads (down to the calling one alone).

constexpr std::int64_t kMinWorkPerThread = 1 << 15;  // ~ pixels; a thread start costs ~10 us

template <typename Fn>
void parallel_for(std::int64_t count, std::int64_t work_per_item, int num_threads, const Fn& fn) {
  if (count <= 0) return;
  const std::int64_t by_work = std::max<std::int64_t>(1, count * work_per_item / kMinWorkPerThread);
  const auto threads = static_cast<int>(
      std::min<std::int64_t>({count, by_work, static_cast<std::int64_t>(resolve_num_threads(num_threads))}));
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  std::int64_t begin = 0;
  for (int t = 0; t < threads; ++t) {
    const std::int64_t end = begin + count / threads + (t < count % threads ? 1 : 0);
    if (t + 1 == threads) {
      fn(begin, end);
    } else {
      try {
        pool.emplace_back(std::cref(fn), begin, end);
      } catch (const std::system_error&) {  // cannot start a thread: do the chunk here
        fn(begin, end);
      }
    }
    begin = end;
  }
  for (auto& thread : pool) thread.join();
}

void check_dims(std::int64_t n, std::int64_t h, std::int64_t w) {
  if (n < 0 || h < 0 || w < 0) {
    throw std::invalid_argument("dimensions must be >= 0, got n=" + std::to_string(n) +
                                " h=" + std::to_string(h) + " w=" + std::to_string(w));
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels over a run of contiguous pixels. Each returns the number of NaN values it met.

// clip(v, 0, 1) with NaN -> 0 (both comparisons are false for NaN), then round to a LUT index.
template <typename scalar_t>
inline int lut_index(scalar_t v) {
  v = v > scalar_t(0) ? v : scalar_t(0);
  v = v < scalar_t(1) ? v : scalar_t(1);
  return static_cast<int>(v * scalar_t(255) + scalar_t(0.5));
}

template <typename scalar_t>
std::int64_t colorize_pixels(const scalar_t* maps, std::int64_t pixels, const std::uint8_t* lut,
                             std::uint8_t* out) {
  std::int64_t nan = 0;
  for (std::int64_t p = 0; p < pixels; ++p) {
    nan += std::isnan(maps[p]);
    const std::uint8_t* color = lut + 3 * lut_index(maps[p]);
    out[3 * p] = color[0];
    out[3 * p + 1] = color[1];
    out[3 * p + 2] = color[2];
  }
  return nan;
}

// image_term[v] = (1 - alpha) * v and color_term[3 i + c] = alpha * lut[3 i + c], rounded to
// scalar_t: the same products, with the same rounding, as computing them per pixel.
template <typename scalar_t>
struct BlendTables {
  scalar_t image_term[256];
  scalar_t color_term[3 * kLutEntries];

  BlendTables(scalar_t alpha, const std::uint8_t* lut) {
    const scalar_t beta = scalar_t(1) - alpha;
    for (int v = 0; v < 256; ++v) image_term[v] = beta * scalar_t(v);
    for (int i = 0; i < 3 * kLutEntries; ++i) color_term[i] = alpha * scalar_t(lut[i]);
  }
};

template <typename scalar_t>
std::int64_t overlay_pixels(const scalar_t* maps, const std::uint8_t* images, std::int64_t pixels,
                            const BlendTables<scalar_t>& tables, std::uint8_t* out) {
  std::int64_t nan = 0;
  for (std::int64_t p = 0; p < pixels; ++p) {
    nan += std::isnan(maps[p]);
    const scalar_t* color = tables.color_term + 3 * lut_index(maps[p]);
    for (int c = 0; c < 3; ++c) {
      // (1 - alpha) * image + alpha * color, then + 0.5: each step rounded to scalar_t, as in
      // NumPy (and no FMA: built with -ffp-contract=off). The sum lies in [0.5, 256), so
      // truncation is floor.
      const scalar_t blended = tables.image_term[images[3 * p + c]] + color[c];
      out[3 * p + c] = static_cast<std::uint8_t>(static_cast<int>(blended + scalar_t(0.5)));
    }
  }
  return nan;
}

}  // namespace

std::vector<std::string> colormap_names() {
  std::vector<std::string> names;
  for (const auto& spec : colormap_specs()) names.emplace_back(spec.name);
  return names;
}

Lut colormap_lut(const std::string& name) {
  const auto& specs = colormap_specs();
  const auto spec = std::find_if(specs.begin(), specs.end(),
                                 [&](const ColormapSpec& s) { return name == s.name; });
  if (spec == specs.end()) {
    std::string known;
    for (const auto& s : specs) known += (known.empty() ? "" : ", ") + std::string(s.name);
    throw std::invalid_argument("unknown colormap '" + name + "'; known colormaps: " + known);
  }
  Lut lut{};
  for (int i = 0; i < kLutEntries; ++i) {
    const double x = i / 255.0;
    for (int c = 0; c < 3; ++c) lut[3 * i + c] = round_to_uint8(interpolate(spec->rgb[c], x));
  }
  return lut;
}

int resolve_num_threads(int num_threads) {
  if (num_threads < 0) {
    throw std::invalid_argument("num_threads must be >= 0 (0 = all cores), got " +
                                std::to_string(num_threads));
  }
  if (num_threads > 0) return num_threads;
  return std::max(1u, std::thread::hardware_concurrency());
}

std::int64_t colorize(const float* maps, std::int64_t n, std::int64_t h, std::int64_t w,
                      const Lut& lut, std::uint8_t* out, int num_threads) {
  check_dims(n, h, w);
  resolve_num_threads(num_threads);
  if (n * h * w == 0) return 0;
  if (maps == nullptr || out == nullptr) throw std::invalid_argument("colorize: null data pointer");

  std::atomic<std::int64_t> nan{0};
  parallel_for(n * h, w, num_threads, [&](std::int64_t row_begin, std::int64_t row_end) {
    const std::int64_t first = row_begin * w;
    nan += colorize_pixels(maps + first, (row_end - row_begin) * w, lut.data(), out + 3 * first);
  });
  return nan.load();
}

std::int64_t overlay(const float* maps, const std::uint8_t* images, std::int64_t n, std::int64_t h,
                     std::int64_t w, float alpha, const Lut& lut, std::uint8_t* out, int num_threads) {
  check_dims(n, h, w);
  resolve_num_threads(num_threads);
  if (!(alpha >= 0.0f && alpha <= 1.0f)) {  // also rejects NaN
    throw std::invalid_argument("alpha must lie in [0, 1], got " + std::to_string(alpha));
  }
  if (n * h * w == 0) return 0;
  if (maps == nullptr || images == nullptr || out == nullptr) {
    throw std::invalid_argument("overlay: null data pointer");
  }

  const BlendTables<float> tables(alpha, lut.data());
  std::atomic<std::int64_t> nan{0};
  parallel_for(n * h, w, num_threads, [&](std::int64_t row_begin, std::int64_t row_end) {
    const std::int64_t first = row_begin * w;
    nan += overlay_pixels(maps + first, images + 3 * first, (row_end - row_begin) * w, tables,
                          out + 3 * first);
  });
  return nan.load();
}

}  // namespace pyattr

// Host-side post-processing of attribution maps: plain C++17, no Python, no torch.
//
// Layout conventions: maps are float32 (N, H, W), images and outputs are uint8 RGB
// (N, H, W, 3), all C-contiguous and passed as raw pointers plus their dimensions.
// The NumPy twin in pyattr/render.py computes bit-identical results; any change to a
// formula here must be made there too (tests/test_render.py holds them together).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace pyattr {

constexpr int kLutEntries = 256;

// Colormap lookup table: entry i (RGB at bytes 3i..3i+2) is the colormap at x = i / 255.
using Lut = std::array<std::uint8_t, 3 * kLutEntries>;

// Names accepted by colormap_lut, in a fixed order: "jet", "hot", "gray".
std::vector<std::string> colormap_names();

// The LUT of a matplotlib colormap, computed from its piecewise-linear segment data in
// double precision and rounded as floor(v * 255 + 0.5).
// Throws std::invalid_argument for an unknown name (the message lists the known ones).
Lut colormap_lut(const std::string& name);

// num_threads as the kernels use it: 0 -> std::thread::hardware_concurrency() (at least 1).
// Throws std::invalid_argument if num_threads < 0.
int resolve_num_threads(int num_threads);

// out[p] = lut[(int)(clip(maps[p], 0, 1) * 255.0f + 0.5f)] for every pixel p of (n, h, w).
// +/-inf are clipped like any other value; NaN pixels get lut[0] and are counted.
// Returns the number of NaN values in maps. out has n * h * w * 3 bytes.
std::int64_t colorize(const float* maps, std::int64_t n, std::int64_t h, std::int64_t w,
                      const Lut& lut, std::uint8_t* out, int num_threads = 0);

// Alpha blend of the colorized maps over RGB images, per channel, in float32:
//   out = (uint8) floor((1 - alpha) * image + alpha * colorize(map) + 0.5)
// alpha must lie in [0, 1]. Returns the number of NaN values in maps (see colorize).
std::int64_t overlay(const float* maps, const std::uint8_t* images, std::int64_t n, std::int64_t h,
                     std::int64_t w, float alpha, const Lut& lut, std::uint8_t* out,
                     int num_threads = 0);

}  // namespace pyattr

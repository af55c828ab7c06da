// pyattr_explain: run an exported TorchScript attribution graph (.pt from pyattr.export) on one
// image with libtorch, and post-process with pyattr's C++ core (csrc/postprocess.hpp).
//
//   pyattr_explain MODEL.pt IMAGE.ppm OUT_PREFIX [--target K] [--alpha A] [--cmap NAME] [--threads N]
//
// Reads a binary PPM (P6, maxval 255) RGB image; writes OUT_PREFIX_map.npy (the graph's map,
// float32 (H, W) at the model's input size) and OUT_PREFIX_overlay.ppm (the heatmap over the image
// at its own size); prints one JSON line: explained class, its name, its score, the files.
//
// Preprocessing follows the metadata stored in the .pt (extra file "pyattr.json"): the image is
// resized to the input size with the core's bilinear resize (align_corners=False, no antialias:
// torch.nn.functional.interpolate), then x * scale, then (x - mean) / std.
#include <torch/script.h>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "postprocess.hpp"

namespace {

// ---- a minimal reader for the flat values of pyattr's metadata JSON ----------------------------

// Position just after `"key":` (searching from `from`), or npos.
std::size_t value_of(const std::string& json, const std::string& key, std::size_t from = 0) {
  const std::string quoted = "\"" + key + "\"";
  std::size_t at = json.find(quoted, from);
  if (at == std::string::npos) return at;
  at = json.find(':', at + quoted.size());
  if (at == std::string::npos) return at;
  ++at;
  while (at < json.size() && std::isspace(static_cast<unsigned char>(json[at]))) ++at;
  return at;
}

std::vector<double> number_array(const std::string& json, const std::string& key, std::size_t from,
                                 std::vector<double> fallback) {
  std::size_t at = value_of(json, key, from);
  if (at == std::string::npos || json[at] != '[') return fallback;
  std::vector<double> values;
  const char* p = json.c_str() + at + 1;
  while (true) {
    while (*p == ' ' || *p == ',' || *p == '\n') ++p;
    if (*p == ']' || *p == '\0') break;
    char* end = nullptr;
    values.push_back(std::strtod(p, &end));
    if (end == p) throw std::runtime_error("metadata: bad number in \"" + key + "\"");
    p = end;
  }
  return values;
}

double number(const std::string& json, const std::string& key, std::size_t from, double fallback) {
  const std::size_t at = value_of(json, key, from);
  if (at == std::string::npos || json.compare(at, 4, "null") == 0) return fallback;
  return std::strtod(json.c_str() + at, nullptr);
}

std::string string_value(const std::string& json, const std::string& key, std::size_t from, std::string fallback) {
  const std::size_t at = value_of(json, key, from);
  if (at == std::string::npos || json[at] != '"') return fallback;
  return json.substr(at + 1, json.find('"', at + 1) - at - 1);
}

std::vector<std::string> string_array(const std::string& json, const std::string& key) {
  std::vector<std::string> values;
  std::size_t at = value_of(json, key);
  if (at == std::string::npos || json[at] != '[') return values;
  for (++at; at < json.size() && json[at] != ']'; ++at) {
    if (json[at] != '"') continue;
    std::string s;
    for (++at; at < json.size() && json[at] != '"'; ++at) s += json[at] == '\\' ? json[++at] : json[at];
    values.push_back(s);
  }
  return values;
}

// ---- images and arrays -------------------------------------------------------------------------

struct Image {
  std::int64_t h = 0, w = 0;
  std::vector<std::uint8_t> rgb;  // (h, w, 3)
};

Image read_ppm(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open image " + path);
  std::string magic;
  f >> magic;
  auto next_int = [&]() {
    f >> std::ws;
    while (f.peek() == '#') {  // comments
      std::string line;
      std::getline(f, line);
      f >> std::ws;
    }
    long v = -1;
    f >> v;
    return v;
  };
  Image im;
  im.w = next_int();
  im.h = next_int();
  const long maxval = next_int();
  if (magic != "P6" || im.w <= 0 || im.h <= 0 || maxval != 255) {
    throw std::runtime_error(path + ": expected a binary PPM (P6) with maxval 255");
  }
  f.get();  // the single whitespace after maxval
  im.rgb.resize(static_cast<std::size_t>(im.h * im.w * 3));
  f.read(reinterpret_cast<char*>(im.rgb.data()), static_cast<std::streamsize>(im.rgb.size()));
  if (!f) throw std::runtime_error(path + ": truncated pixel data");
  return im;
}

void write_ppm(const std::string& path, const std::uint8_t* rgb, std::int64_t h, std::int64_t w) {
  std::ofstream f(path, std::ios::binary);
  f << "P6\n" << w << " " << h << "\n255\n";
  f.write(reinterpret_cast<const char*>(rgb), static_cast<std::streamsize>(h * w * 3));
  if (!f) throw std::runtime_error("cannot write " + path);
}

void write_npy(const std::string& path, const float* data, std::int64_t h, std::int64_t w) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(h) + ", " +
                       std::to_string(w) + "), }";
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  const std::uint16_t length = static_cast<std::uint16_t>(header.size());
  f.put(static_cast<char>(length & 0xff));
  f.put(static_cast<char>(length >> 8));
  f << header;
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(h * w * sizeof(float)));
  if (!f) throw std::runtime_error("cannot write " + path);
}

int usage() {
  std::cerr << "usage: pyattr_explain MODEL.pt IMAGE.ppm OUT_PREFIX [--target K] [--alpha A] [--cmap NAME] "
               "[--threads N]\n";
  return 2;
}

int run(int argc, char** argv) {
  if (argc < 4) return usage();
  const std::string model_path = argv[1], image_path = argv[2], prefix = argv[3];
  std::int64_t target = -1;
  float alpha = 0.5f;
  std::string cmap = "jet";
  int threads = 0;
  for (int i = 4; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return usage();
    if (arg == "--target") target = std::stoll(argv[++i]);
    else if (arg == "--alpha") alpha = std::stof(argv[++i]);
    else if (arg == "--cmap") cmap = argv[++i];
    else if (arg == "--threads") threads = std::stoi(argv[++i]);
    else return usage();
  }

  // the graph and its metadata
  torch::jit::ExtraFilesMap extra{{"pyattr.json", ""}};
  torch::jit::script::Module module = torch::jit::load(model_path, torch::kCPU, extra);
  module.eval();
  const std::string& meta = extra["pyattr.json"];
  if (meta.empty()) throw std::runtime_error(model_path + " holds no pyattr metadata (pyattr.json)");
  const std::size_t pre = value_of(meta, "preprocessing");
  const std::vector<double> shape = number_array(meta, "input_shape", 0, {3, 224, 224});
  const std::vector<double> size = number_array(meta, "size", pre, {shape[1], shape[2]});
  const std::vector<double> mean = number_array(meta, "mean", pre, {0, 0, 0});
  const std::vector<double> std_ = number_array(meta, "std", pre, {1, 1, 1});
  const double scale = number(meta, "scale", pre, 1.0 / 255.0);
  const bool bgr = string_value(meta, "color", pre, "RGB") == "BGR";
  const std::vector<std::string> class_names = string_array(meta, "class_names");
  if (size.size() != 2 || mean.size() != 3 || std_.size() != 3) throw std::runtime_error("metadata: bad preprocessing");
  const auto H = static_cast<std::int64_t>(size[0]), W = static_cast<std::int64_t>(size[1]);

  // preprocessing: planar float (3, h, w) -> core bilinear resize -> scale, mean, std
  const Image image = read_ppm(image_path);
  std::vector<float> planes(static_cast<std::size_t>(3 * image.h * image.w));
  for (std::int64_t p = 0; p < image.h * image.w; ++p) {
    for (int c = 0; c < 3; ++c) planes[c * image.h * image.w + p] = image.rgb[3 * p + (bgr ? 2 - c : c)];
  }
  torch::Tensor x = torch::empty({1, 3, H, W}, torch::kFloat32);
  float* xp = x.data_ptr<float>();
  pyattr::resize_bilinear(planes.data(), 3, image.h, image.w, H, W, false, xp, threads);
  for (int c = 0; c < 3; ++c) {
    const auto m = static_cast<float>(mean[c]), s = static_cast<float>(std_[c]), k = static_cast<float>(scale);
    for (std::int64_t p = 0; p < H * W; ++p) xp[c * H * W + p] = (xp[c * H * W + p] * k - m) / s;
  }

  // the graph: (images, target) -> scores, explained_class, raw, maps
  torch::NoGradGuard no_grad;
  const torch::IValue result = module.forward({x, torch::full({1}, target, torch::kInt64)});
  std::vector<torch::IValue> outputs;
  if (result.isTuple()) outputs = result.toTupleRef().elements().vec();
  else for (const auto& v : result.toListRef()) outputs.push_back(v);
  if (outputs.size() != 4) throw std::runtime_error("the graph must return (scores, explained_class, raw, maps)");
  const torch::Tensor scores = outputs[0].toTensor().contiguous();
  const std::int64_t k = outputs[1].toTensor().item<std::int64_t>();
  const torch::Tensor maps = outputs[3].toTensor().to(torch::kFloat32).contiguous();
  if (maps.dim() != 3 || maps.size(0) != 1) throw std::runtime_error("expected maps of shape (1, H, W)");
  const std::int64_t mh = maps.size(1), mw = maps.size(2);

  // post-processing with the core: resize to the image, clip to [0, 1], colormap, overlay
  pyattr::RenderOptions options;
  options.normalization.fixed_range = true;  // the graph's maps are already in [0, 1]
  options.normalization.range_lo = 0.0f;
  options.normalization.range_hi = 1.0f;
  options.alpha = alpha;
  std::vector<std::uint8_t> overlay(image.rgb.size());
  pyattr::render(maps.data_ptr<float>(), 1, mh, mw, image.rgb.data(), image.h, image.w, options,
                 pyattr::colormap_lut(cmap), overlay.data(), threads);

  write_npy(prefix + "_map.npy", maps.data_ptr<float>(), mh, mw);
  write_ppm(prefix + "_overlay.ppm", overlay.data(), image.h, image.w);
  const std::string name = k >= 0 && k < static_cast<std::int64_t>(class_names.size())
                               ? class_names[static_cast<std::size_t>(k)] : "class " + std::to_string(k);
  std::printf("{\"explained_class\": %lld, \"class_name\": \"%s\", \"score\": %.9g, \"map\": \"%s_map.npy\", "
              "\"overlay\": \"%s_overlay.ppm\"}\n",
              static_cast<long long>(k), name.c_str(), scores[0][k].item<double>(), prefix.c_str(), prefix.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "pyattr_explain: error: " << e.what() << "\n";
    return 1;
  }
}

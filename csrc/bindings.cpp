// pybind11 module pyattr._C: the only file of csrc/ that knows about Python.
//
// Inputs are taken as they are, never copied: they must already be C-contiguous, aligned
// arrays of an accepted dtype (maps: float32 or float16; images: uint8); pyattr.render converts
// before calling. The GIL is released around the kernels. The core checks its options (alpha,
// num_threads, sign, outlier_perc, value_range, sizes) itself, before any work; its
// std::invalid_argument becomes ValueError, NonFiniteError a ValueError with a NumPy hint.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "postprocess.hpp"

namespace py = pybind11;

namespace {

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string fix_hint(const char* arg, const char* dtype) {
  return std::string("; convert with np.ascontiguousarray(") + arg + ", dtype=np." + dtype + ")";
}

void check_layout(const py::array& a, const char* arg, const char* dtype, std::size_t alignment,
                  py::ssize_t ndim, const char* layout) {
  const bool aligned = a.size() == 0 || reinterpret_cast<std::uintptr_t>(a.data()) % alignment == 0;
  if (!(a.flags() & py::array::c_style) || !aligned) {
    throw py::value_error(std::string(arg) + " must be C-contiguous and aligned (pyattr._C does not copy its inputs)" +
                          fix_hint(arg, dtype));
  }
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(arg) + " must have shape " + layout + ", got shape " + shape_of(a));
  }
}

py::array as_array(const py::object& obj, const char* arg, const char* dtypes, const char* dtype) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(arg) + " must be a numpy.ndarray of dtype " + dtypes + ", got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))) + fix_hint(arg, dtype));
  }
  return py::reinterpret_borrow<py::array>(obj);
}

// (N, H, W) maps of dtype float32 or float16, C-contiguous and aligned.
struct Maps {
  py::array array;
  bool half;

  std::int64_t n() const { return array.shape(0); }
  std::int64_t h() const { return array.shape(1); }
  std::int64_t w() const { return array.shape(2); }
  const float* f32() const { return static_cast<const float*>(array.data()); }
  const pyattr::Half* f16() const { return static_cast<const pyattr::Half*>(array.data()); }
};

Maps checked_maps(const py::object& obj) {
  py::array a = as_array(obj, "maps", "float32 or float16", "float32");
  const bool half = a.dtype().equal(py::dtype("float16"));
  if (!half && !a.dtype().equal(py::dtype::of<float>())) {
    throw py::type_error("maps must have dtype float32 or float16, got " + std::string(py::str(a.dtype())) +
                         fix_hint("maps", "float32"));
  }
  check_layout(a, "maps", "float32", half ? 2 : 4, 3, "(N, H, W)");
  return {a, half};
}

// uint8 (N, H, W, 3) images that go with maps (or `other`) of batch n.
py::array checked_images(const py::object& obj, std::int64_t n, const char* other = "maps") {
  py::array a = as_array(obj, "images", "uint8", "uint8");
  if (!a.dtype().equal(py::dtype::of<std::uint8_t>())) {
    throw py::type_error("images must have dtype uint8, got " + std::string(py::str(a.dtype())) +
                         fix_hint("images", "uint8"));
  }
  check_layout(a, "images", "uint8", 1, 4, "(N, H, W, 3)");
  if (a.shape(3) != 3) {
    throw py::value_error("images must be RGB with 3 channels in the last axis, got shape " + shape_of(a));
  }
  if (a.shape(0) != n) {
    throw py::value_error(std::string(other) + " and images must have the same batch size: " + other + " " +
                          std::to_string(n) + ", images " + shape_of(a));
  }
  return a;
}

py::array_t<std::uint8_t> rgb_output(std::int64_t n, std::int64_t h, std::int64_t w) {
  return py::array_t<std::uint8_t>(std::vector<py::ssize_t>{n, h, w, 3});
}

pyattr::Normalization make_normalization(const std::string& sign, double outlier_perc,
                                         const std::optional<std::pair<float, float>>& value_range) {
  pyattr::Normalization o;
  o.sign = pyattr::parse_sign(sign);
  o.outlier_perc = outlier_perc;
  if (value_range) {
    o.fixed_range = true;
    o.range_lo = value_range->first;
    o.range_hi = value_range->second;
  }
  pyattr::check_normalization(o);
  return o;
}

py::tuple colorize(const py::object& maps_obj, const std::string& cmap, int num_threads) {
  const Maps maps = checked_maps(maps_obj);
  const pyattr::Lut lut = pyattr::colormap_lut(cmap);
  auto out = rgb_output(maps.n(), maps.h(), maps.w());
  std::uint8_t* o = out.mutable_data();
  std::int64_t nan = 0;
  {
    py::gil_scoped_release release;
    nan = maps.half ? pyattr::colorize(maps.f16(), maps.n(), maps.h(), maps.w(), lut, o, num_threads)
                    : pyattr::colorize(maps.f32(), maps.n(), maps.h(), maps.w(), lut, o, num_threads);
  }
  return py::make_tuple(out, nan);
}

py::tuple overlay(const py::object& maps_obj, const py::object& images_obj, float alpha, const std::string& cmap,
                  int num_threads) {
  const Maps maps = checked_maps(maps_obj);
  const py::array images = checked_images(images_obj, maps.n());
  for (int d = 1; d < 3; ++d) {
    if (images.shape(d) != maps.array.shape(d)) {
      throw py::value_error("maps and images must agree in (N, H, W): maps " + shape_of(maps.array) +
                            ", images " + shape_of(images));
    }
  }
  const pyattr::Lut lut = pyattr::colormap_lut(cmap);
  auto out = rgb_output(maps.n(), maps.h(), maps.w());
  const auto* img = static_cast<const std::uint8_t*>(images.data());
  std::uint8_t* o = out.mutable_data();
  std::int64_t nan = 0;
  {
    py::gil_scoped_release release;
    nan = maps.half
              ? pyattr::overlay(maps.f16(), img, maps.n(), maps.h(), maps.w(), alpha, lut, o, num_threads)
              : pyattr::overlay(maps.f32(), img, maps.n(), maps.h(), maps.w(), alpha, lut, o, num_threads);
  }
  return py::make_tuple(out, nan);
}

py::array_t<float> normalize(const py::object& maps_obj, const std::string& sign, double outlier_perc,
                             const std::optional<std::pair<float, float>>& value_range, int num_threads) {
  const Maps maps = checked_maps(maps_obj);
  const pyattr::Normalization options = make_normalization(sign, outlier_perc, value_range);
  pyattr::resolve_num_threads(num_threads);
  py::array_t<float> out(std::vector<py::ssize_t>{maps.n(), maps.h(), maps.w()});
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    if (maps.half) {
      pyattr::normalize(maps.f16(), maps.n(), maps.h(), maps.w(), options, o, num_threads);
    } else {
      pyattr::normalize(maps.f32(), maps.n(), maps.h(), maps.w(), options, o, num_threads);
    }
  }
  return out;
}

void check_size(std::int64_t n, std::int64_t h, std::int64_t w) {
  if (h < 1 || w < 1 || h > pyattr::kMaxSide || w > pyattr::kMaxSide) {
    throw py::value_error("size must be (H, W) with 1 <= H, W <= " + std::to_string(pyattr::kMaxSide) + ", got (" +
                          std::to_string(h) + ", " + std::to_string(w) + ")");
  }
  if (n > 0 && h * w > pyattr::kMaxElements / n) {
    throw py::value_error("output of " + std::to_string(n) + " x " + std::to_string(h) + " x " + std::to_string(w) +
                          " pixels is too large (limit " + std::to_string(pyattr::kMaxElements) +
                          " pixels per call); split the batch");
  }
}

py::array_t<float> resize(const py::object& maps_obj, const std::pair<std::int64_t, std::int64_t>& size,
                          bool align_corners, int num_threads) {
  const Maps maps = checked_maps(maps_obj);
  const auto [out_h, out_w] = size;
  check_size(maps.n(), out_h, out_w);  // before allocating the output
  pyattr::resolve_num_threads(num_threads);
  py::array_t<float> out(std::vector<py::ssize_t>{maps.n(), out_h, out_w});
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    if (maps.half) {
      pyattr::resize_bilinear(maps.f16(), maps.n(), maps.h(), maps.w(), out_h, out_w, align_corners, o, num_threads);
    } else {
      pyattr::resize_bilinear(maps.f32(), maps.n(), maps.h(), maps.w(), out_h, out_w, align_corners, o, num_threads);
    }
  }
  return out;
}

py::array_t<std::uint8_t> render(const py::object& maps_obj, const py::object& images_obj,
                                 const std::optional<std::pair<std::int64_t, std::int64_t>>& size, float alpha,
                                 const std::string& cmap, const std::string& sign, double outlier_perc,
                                 const std::optional<std::pair<float, float>>& value_range, bool align_corners,
                                 int num_threads) {
  const Maps maps = checked_maps(maps_obj);
  pyattr::RenderOptions options;
  options.normalization = make_normalization(sign, outlier_perc, value_range);
  options.align_corners = align_corners;
  options.alpha = alpha;
  const std::uint8_t* img = nullptr;
  std::int64_t out_h = maps.h(), out_w = maps.w();
  py::array images;
  if (!images_obj.is_none()) {
    images = checked_images(images_obj, maps.n());
    out_h = images.shape(1);
    out_w = images.shape(2);
    if (size && (size->first != out_h || size->second != out_w)) {
      throw py::value_error("size (" + std::to_string(size->first) + ", " + std::to_string(size->second) +
                            ") differs from the images' (H, W) " + shape_of(images) +
                            "; leave size=None to render at the images' size");
    }
    img = static_cast<const std::uint8_t*>(images.data());
    if (!(alpha >= 0.0f && alpha <= 1.0f)) {
      throw py::value_error("alpha must lie in [0, 1], got " + std::to_string(alpha));
    }
  } else if (size) {
    out_h = size->first;
    out_w = size->second;
  }
  check_size(maps.n(), out_h, out_w);
  pyattr::resolve_num_threads(num_threads);
  const pyattr::Lut lut = pyattr::colormap_lut(cmap);
  auto out = rgb_output(maps.n(), out_h, out_w);
  std::uint8_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    if (maps.half) {
      pyattr::render(maps.f16(), maps.n(), maps.h(), maps.w(), img, out_h, out_w, options, lut, o, num_threads);
    } else {
      pyattr::render(maps.f32(), maps.n(), maps.h(), maps.w(), img, out_h, out_w, options, lut, o, num_threads);
    }
  }
  return out;
}

// draw_boxes(images uint8 (N, H, W, 3), boxes float64 (N, B, 4), colors uint8 (N, B, 3) | None) -> new images.
py::array_t<std::uint8_t> draw_boxes(const py::object& images_obj, const py::object& boxes_obj,
                                     const py::object& colors_obj, std::int64_t thickness, int num_threads) {
  py::array boxes = as_array(boxes_obj, "boxes", "float64", "float64");
  if (!boxes.dtype().equal(py::dtype::of<double>())) {
    throw py::type_error("boxes must have dtype float64, got " + std::string(py::str(boxes.dtype())) +
                         fix_hint("boxes", "float64"));
  }
  check_layout(boxes, "boxes", "float64", alignof(double), 3, "(N, B, 4)");
  if (boxes.shape(2) != 4) {
    throw py::value_error("boxes must have shape (N, B, 4) (x1, y1, x2, y2 per box), got shape " + shape_of(boxes));
  }
  const std::int64_t n = boxes.shape(0), b = boxes.shape(1);
  const py::array images = checked_images(images_obj, n, "boxes");
  const std::uint8_t* colors = nullptr;
  py::array colors_array;
  if (!colors_obj.is_none()) {
    colors_array = as_array(colors_obj, "colors", "uint8", "uint8");
    if (!colors_array.dtype().equal(py::dtype::of<std::uint8_t>())) {
      throw py::type_error("colors must have dtype uint8, got " + std::string(py::str(colors_array.dtype())) +
                           fix_hint("colors", "uint8"));
    }
    check_layout(colors_array, "colors", "uint8", 1, 3, "(N, B, 3)");
    if (colors_array.shape(0) != n || colors_array.shape(1) != b || colors_array.shape(2) != 3) {
      throw py::value_error("colors must have shape (N, B, 3) = (" + std::to_string(n) + ", " + std::to_string(b) +
                            ", 3) to go with boxes " + shape_of(boxes) + ", got shape " + shape_of(colors_array));
    }
    colors = static_cast<const std::uint8_t*>(colors_array.data());
  }
  const std::int64_t h = images.shape(1), w = images.shape(2);
  auto out = rgb_output(n, h, w);
  const auto* img = static_cast<const std::uint8_t*>(images.data());
  const auto* box = static_cast<const double*>(boxes.data());
  std::uint8_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    pyattr::draw_boxes(img, n, h, w, box, b, colors, thickness, o, num_threads);
  }
  return out;
}

// A float32 array of ndim dimensions (layout names them), C-contiguous and aligned (DeepLIFT's rule kernels).
py::array checked_float32(const py::object& obj, const char* arg, py::ssize_t ndim, const char* layout) {
  py::array a = as_array(obj, arg, "float32", "float32");
  if (!a.dtype().equal(py::dtype::of<float>())) {
    throw py::type_error(std::string(arg) + " must have dtype float32, got " + std::string(py::str(a.dtype())) +
                         fix_hint(arg, "float32"));
  }
  check_layout(a, arg, "float32", 4, ndim, layout);
  return a;
}

// float32 (count,) values.
py::array checked_values(const py::object& obj, const char* arg) { return checked_float32(obj, arg, 1, "(count,)"); }

void relu_rescale(const py::object& u_obj, const py::object& ur_obj, const py::object& out_obj, double eps,
                  int num_threads) {
  py::array u = checked_values(u_obj, "u"), ur = checked_values(ur_obj, "ur"), out = checked_values(out_obj, "out");
  if (ur.size() != u.size() || out.size() != u.size()) {
    throw py::value_error("u, ur and out must have the same size, got " + shape_of(u) + ", " + shape_of(ur) +
                          " and " + shape_of(out));
  }
  if (!out.writeable()) throw py::value_error("out must be writeable");
  if (u.size() > 0 && (out.data() == u.data() || out.data() == ur.data())) {
    throw py::value_error("out may not be u or ur");
  }
  const auto* a = static_cast<const float*>(u.data());
  const auto* b = static_cast<const float*>(ur.data());
  auto* o = static_cast<float*>(out.mutable_data());
  const std::int64_t count = u.size();
  py::gil_scoped_release release;
  pyattr::relu_rescale(a, b, count, static_cast<float>(eps), o, num_threads);
}

// float32 (R, C, H, W) planes, of like's shape when like is not null.
py::array checked_planes(const py::object& obj, const char* arg, const py::array* like = nullptr) {
  py::array a = checked_float32(obj, arg, 4, "(R, C, H, W)");
  if (like != nullptr) {
    for (py::ssize_t d = 0; d < 4; ++d) {
      if (a.shape(d) != like->shape(d)) {
        throw py::value_error(std::string(arg) + " must have shape " + shape_of(*like) + ", got " + shape_of(a));
      }
    }
  }
  return a;
}

void maxpool_rescale_backward(const py::object& x_obj, const py::object& xr_obj, const py::object& out_obj,
                              const py::object& yr_obj, const py::object& grad_obj, const py::object& tol_x_obj,
                              const py::object& tol_r_obj, std::pair<std::int64_t, std::int64_t> kernel,
                              std::pair<std::int64_t, std::int64_t> stride,
                              std::pair<std::int64_t, std::int64_t> padding,
                              std::pair<std::int64_t, std::int64_t> dilation, double eps, const py::object& result_obj,
                              int num_threads) {
  py::array x = checked_planes(x_obj, "x"), xr = checked_planes(xr_obj, "xr", &x);
  py::array out = checked_planes(out_obj, "out");
  py::array yr = checked_planes(yr_obj, "yr", &out), grad = checked_planes(grad_obj, "grad", &out);
  py::array result = checked_planes(result_obj, "result", &x);
  if (out.shape(0) != x.shape(0) || out.shape(1) != x.shape(1)) {
    throw py::value_error("out must have x's rows and channels, got " + shape_of(out) + " for x " + shape_of(x));
  }
  py::array tol_x = checked_values(tol_x_obj, "tol_x"), tol_r = checked_values(tol_r_obj, "tol_r");
  if (tol_x.size() != x.shape(0) || tol_r.size() != x.shape(0)) {
    throw py::value_error("tol_x and tol_r must hold one value per row of x " + shape_of(x));
  }
  if (!result.writeable()) throw py::value_error("result must be writeable");
  for (const py::array* a : {&x, &xr, &out, &yr, &grad, &tol_x, &tol_r}) {
    if (a->size() > 0 && a->data() == result.data()) throw py::value_error("result may not be an input");
  }
  const pyattr::Pool2d pool{kernel.first,  kernel.second,  stride.first,   stride.second,
                            padding.first, padding.second, dilation.first, dilation.second};
  const auto f = [](const py::array& a) { return static_cast<const float*>(a.data()); };
  auto* o = static_cast<float*>(result.mutable_data());
  const std::int64_t rows = x.shape(0), channels = x.shape(1), h = x.shape(2), w = x.shape(3);
  const std::int64_t oh = out.shape(2), ow = out.shape(3);
  py::gil_scoped_release release;
  pyattr::maxpool_rescale_backward(f(x), f(xr), f(out), f(yr), f(grad), f(tol_x), f(tol_r), rows, channels, h, w,
                                   oh, ow, pool, static_cast<float>(eps), o, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyattr's compiled post-processing core (csrc/). Use pyattr.render, not this module.";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pyattr::NonFiniteError& e) {
      const std::string message = std::string(e.what()) +
                                  "; replace them first, e.g. np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)";
      PyErr_SetString(PyExc_ValueError, message.c_str());
    }
  });

  m.def("colormap_names", &pyattr::colormap_names, "Names of the built-in colormaps.");
  m.def(
      "colormap_lut",
      [](const std::string& name) {
        const pyattr::Lut lut = pyattr::colormap_lut(name);
        py::array_t<std::uint8_t> out(std::vector<py::ssize_t>{pyattr::kLutEntries, 3});
        std::copy(lut.begin(), lut.end(), out.mutable_data());
        return out;
      },
      py::arg("name"), "The (256, 3) uint8 RGB lookup table of a colormap; entry i is at x = i / 255.");
  m.def("colorize", &colorize, py::arg("maps"), py::arg("cmap") = "jet", py::arg("num_threads") = 0,
        "colorize(maps float32|float16 (N, H, W)) -> (uint8 (N, H, W, 3), number of NaN in maps).\n"
        "Values are clipped to [0, 1] (+/-inf included); NaN pixels get lut[0].");
  m.def("overlay", &overlay, py::arg("maps"), py::arg("images"), py::arg("alpha") = 0.5f,
        py::arg("cmap") = "jet", py::arg("num_threads") = 0,
        "overlay(maps float32|float16 (N, H, W), images uint8 (N, H, W, 3)) -> (uint8 (N, H, W, 3), number of NaN).\n"
        "out = floor((1 - alpha) * image + alpha * colorize(map) + 0.5), in float32.");
  m.def("normalize", &normalize, py::arg("maps"), py::arg("sign") = "all", py::arg("outlier_perc") = 0.0,
        py::arg("value_range") = py::none(), py::arg("num_threads") = 0,
        "normalize(maps float32|float16 (N, H, W)) -> float32 (N, H, W) in [0, 1], per sample.\n"
        "sign: all | absolute | positive | negative | centered; outlier_perc in [0, 50); value_range (lo, hi)\n"
        "fixes the range. Raises ValueError on NaN/inf (see csrc/postprocess.hpp).");
  m.def("resize", &resize, py::arg("maps"), py::arg("size"), py::arg("align_corners") = false,
        py::arg("num_threads") = 0,
        "resize(maps float32|float16 (N, h, w), size (H, W)) -> float32 (N, H, W), bilinear like\n"
        "torch.nn.functional.interpolate. Raises ValueError on NaN/inf.");
  m.def("render", &render, py::arg("maps"), py::arg("images") = py::none(), py::arg("size") = py::none(),
        py::arg("alpha") = 0.5f, py::arg("cmap") = "jet", py::arg("sign") = "all", py::arg("outlier_perc") = 0.0,
        py::arg("value_range") = py::none(), py::arg("align_corners") = false, py::arg("num_threads") = 0,
        "render(maps (N, h, w), images uint8 (N, H, W, 3) | None) -> uint8 (N, H, W, 3): resize -> normalize ->\n"
        "colorize -> overlay fused, bit-identical to the steps. Without images: the colored heatmaps at size\n"
        "(default: the maps' size).");
  m.def("draw_boxes", &draw_boxes, py::arg("images"), py::arg("boxes"), py::arg("colors") = py::none(),
        py::arg("thickness") = 2, py::arg("num_threads") = 0,
        "draw_boxes(images uint8 (N, H, W, 3), boxes float64 (N, B, 4) xyxy, colors uint8 (N, B, 3) | None)\n"
        "-> uint8 (N, H, W, 3): a copy with the box outlines drawn inside the boxes, thickness pixels wide;\n"
        "colors None: the 10-color palette by box index. NaN or empty boxes are skipped; +/-inf raise\n"
        "ValueError (see csrc/postprocess.hpp).");
  m.def(
      "box_palette",
      [] {
        const auto& palette = pyattr::box_palette();
        py::array_t<std::uint8_t> out(std::vector<py::ssize_t>{pyattr::kBoxPaletteSize, 3});
        std::copy(palette.begin(), palette.end(), out.mutable_data());
        return out;
      },
      "The (10, 3) uint8 RGB default box colors (matplotlib's tab10); box j gets color j % 10.");
  m.def("relu_rescale", &relu_rescale, py::arg("u"), py::arg("ur"), py::arg("out"), py::arg("eps"),
        py::arg("num_threads") = 0,
        "relu_rescale(u, ur, out: float32 (count,), eps): out = (relu(u) - relu(ur)) / (u - ur), or (u > 0) where\n"
        "|u - ur| < eps: DeepLIFT's Rescale multiplier of ReLU in one pass (used by pyattr.DeepLift's eager calls).");
  m.def("maxpool_rescale_backward", &maxpool_rescale_backward, py::arg("x"), py::arg("xr"), py::arg("out"),
        py::arg("yr"), py::arg("grad"), py::arg("tol_x"), py::arg("tol_r"), py::arg("kernel"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("eps"), py::arg("result"), py::arg("num_threads") = 0,
        "maxpool_rescale_backward(x, xr float32 (R, C, H, W), out, yr, grad float32 (R, C, OH, OW), tol_x, tol_r\n"
        "float32 (R,), kernel, stride, padding, dilation, eps, result float32 (R, C, H, W)): DeepLIFT's max-pool rule,\n"
        "backward, in one pass per plane (used by pyattr.DeepLift's eager calls; see csrc/postprocess.hpp).");
}

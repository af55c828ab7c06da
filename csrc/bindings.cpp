// pybind11 module pyattr._C: the only file of csrc/ that knows about Python.
//
// Inputs are taken as they are, never copied: they must already be C-contiguous, aligned
// arrays of the exact dtype (pyattr.render converts before calling). The GIL is released
// around the kernels. The core checks alpha and num_threads itself, before any work; its
// std::invalid_argument becomes ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "postprocess.hpp"

namespace py = pybind11;

namespace {

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// obj as a numpy array of dtype T, C-contiguous and aligned, with `ndim` dimensions.
template <typename T>
py::array checked_array(const py::object& obj, const char* arg, const char* dtype, py::ssize_t ndim,
                        const char* layout) {
  const std::string fix =
      std::string("; convert with np.ascontiguousarray(") + arg + ", dtype=np." + dtype + ")";
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(arg) + " must be a numpy.ndarray of dtype " + dtype + ", got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))) + fix);
  }
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(py::dtype::of<T>())) {
    throw py::type_error(std::string(arg) + " must have dtype " + dtype + ", got " +
                         std::string(py::str(a.dtype())) + fix);
  }
  const bool aligned = a.size() == 0 || reinterpret_cast<std::uintptr_t>(a.data()) % alignof(T) == 0;
  if (!(a.flags() & py::array::c_style) || !aligned) {
    throw py::value_error(std::string(arg) +
                          " must be C-contiguous and aligned (pyattr._C does not copy its inputs)" + fix);
  }
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(arg) + " must have shape " + layout + ", got shape " + shape_of(a));
  }
  return a;
}

py::array_t<std::uint8_t> rgb_output(const py::array& maps) {
  return py::array_t<std::uint8_t>(
      std::vector<py::ssize_t>{maps.shape(0), maps.shape(1), maps.shape(2), 3});
}

py::tuple colorize(const py::object& maps_obj, const std::string& cmap, int num_threads) {
  const py::array maps = checked_array<float>(maps_obj, "maps", "float32", 3, "(N, H, W)");
  const pyattr::Lut lut = pyattr::colormap_lut(cmap);
  auto out = rgb_output(maps);
  const auto* m = static_cast<const float*>(maps.data());
  std::uint8_t* o = out.mutable_data();
  std::int64_t nan = 0;
  {
    py::gil_scoped_release release;
    nan = pyattr::colorize(m, maps.shape(0), maps.shape(1), maps.shape(2), lut, o, num_threads);
  }
  return py::make_tuple(out, nan);
}

py::tuple overlay(const py::object& maps_obj, const py::object& images_obj, float alpha,
                  const std::string& cmap, int num_threads) {
  const py::array maps = checked_array<float>(maps_obj, "maps", "float32", 3, "(N, H, W)");
  const py::array images = checked_array<std::uint8_t>(images_obj, "images", "uint8", 4, "(N, H, W, 3)");
  if (images.shape(3) != 3) {
    throw py::value_error("images must be RGB with 3 channels in the last axis, got shape " +
                          shape_of(images));
  }
  for (int d = 0; d < 3; ++d) {
    if (images.shape(d) != maps.shape(d)) {
      throw py::value_error("maps and images must agree in (N, H, W): maps " + shape_of(maps) +
                            ", images " + shape_of(images));
    }
  }
  const pyattr::Lut lut = pyattr::colormap_lut(cmap);
  auto out = rgb_output(maps);
  const auto* m = static_cast<const float*>(maps.data());
  const auto* img = static_cast<const std::uint8_t*>(images.data());
  std::uint8_t* o = out.mutable_data();
  std::int64_t nan = 0;
  {
    py::gil_scoped_release release;
    nan = pyattr::overlay(m, img, maps.shape(0), maps.shape(1), maps.shape(2), alpha, lut, o,
                          num_threads);
  }
  return py::make_tuple(out, nan);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyattr's compiled post-processing core (csrc/). Use pyattr.render, not this module.";

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
        "colorize(maps float32 (N, H, W)) -> (uint8 (N, H, W, 3), number of NaN in maps).\n"
        "Values are clipped to [0, 1] (+/-inf included); NaN pixels get lut[0].");
  m.def("overlay", &overlay, py::arg("maps"), py::arg("images"), py::arg("alpha") = 0.5f,
        py::arg("cmap") = "jet", py::arg("num_threads") = 0,
        "overlay(maps float32 (N, H, W), images uint8 (N, H, W, 3)) -> (uint8 (N, H, W, 3), number of NaN).\n"
        "out = floor((1 - alpha) * image + alpha * colorize(map) + 0.5), in float32.");
}

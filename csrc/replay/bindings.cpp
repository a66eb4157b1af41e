// pybind11 face of ReplayCore. Every shape, dtype and range check happens here, before any
// memory is touched; the Python wrapper (fastdream/replay.py) adds friendlier messages on top.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>


#include "replay.hpp"
#include "shape_str.hpp"

namespace py = pybind11;
using fastdream::FieldSpec;
using fastdream::ReplayCore;
using fastdream::shape_str;

namespace {

std::string dtype_name(char kind, int64_t itemsize) {
  if (kind == 'b') return "bool";
  const std::string base = kind == 'f' ? "float" : kind == 'u' ? "uint" : "int";
  return base + std::to_string(itemsize * 8);
}

// Checks `a` is a C-contiguous array of field `f`'s dtype with shape lead + f.shape.
void check_array(const py::array& a, const FieldSpec& f, const std::vector<int64_t>& lead,
                 bool writable, const char* what) {
  std::vector<int64_t> want(lead);
  want.insert(want.end(), f.shape.begin(), f.shape.end());
  std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
  if (a.dtype().kind() != f.kind || a.dtype().itemsize() != f.itemsize)
    throw py::type_error(std::string(what) + " field '" + f.name + "': dtype " +
                         std::string(py::str(a.dtype())) + ", expected " + dtype_name(f.kind, f.itemsize));
  if (got != want)
    throw py::value_error(std::string(what) + " field '" + f.name + "': shape " + shape_str(got) +
                          ", expected " + shape_str(want));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(what) + " field '" + f.name + "': array must be C-contiguous");
  if (writable && !a.writeable())
    throw py::value_error(std::string(what) + " field '" + f.name + "': array is read-only");
}

}  // namespace

PYBIND11_MODULE(_replay, m) {
  m.doc() = "C++ replay ring buffer core for fastdream (one ring per env stream).";

  py::class_<ReplayCore>(m, "ReplayCore")
      .def(py::init([](int64_t capacity, int64_t num_envs, const py::list& spec, uint64_t seed) {
             std::vector<FieldSpec> fields;
             for (const auto& item : spec) {
               auto t = item.cast<py::tuple>();
               FieldSpec f;
               f.name = t[0].cast<std::string>();
               f.shape = t[1].cast<std::vector<int64_t>>();
               py::dtype dt = py::dtype::from_args(t[2]);
               f.kind = dt.kind();
               f.itemsize = dt.itemsize();
               int64_t n = 1;
               for (int64_t d : f.shape) {
                 if (d <= 0) throw py::value_error("field '" + f.name + "': dimensions must be >= 1");
                 n *= d;
               }
               f.row_bytes = n * f.itemsize;
               fields.push_back(f);
             }
             if (fields.empty()) throw py::value_error("spec must name at least one field");
             return new ReplayCore(capacity, num_envs, std::move(fields), seed);
           }),
           py::arg("capacity"), py::arg("num_envs"), py::arg("spec"), py::arg("seed"),
           "Allocates zeroed storage; spec is a list of (name, shape, dtype).")
      .def_property_readonly("num_envs", &ReplayCore::num_envs)
      .def_property_readonly("env_capacity", &ReplayCore::env_capacity,
                             "Rows kept per env stream (capacity // num_envs).")
      .def("counts", &ReplayCore::counts, "Rows ever written per env, [num_envs].")
      .def("set_counts", &ReplayCore::set_counts, py::arg("counts"))
      .def("size", &ReplayCore::size, "Rows currently stored over all envs.")
      .def("num_windows", &ReplayCore::num_windows, py::arg("seq_len"),
           "Complete windows of seq_len rows over all envs.")
      .def(
          "add",
          [](ReplayCore& self, py::array_t<int64_t, py::array::c_style> env_ids, const py::list& arrays) {
            const auto& fields = self.fields();
            if (env_ids.ndim() != 1) throw py::value_error("env_ids must be 1-D");
            const int64_t n = env_ids.shape(0);
            if (py::len(arrays) != fields.size())
              throw py::value_error("add expects one array per spec field");
            const int64_t* ids = env_ids.data();
            std::vector<bool> seen(static_cast<size_t>(self.num_envs()), false);
            for (int64_t i = 0; i < n; ++i) {
              if (ids[i] < 0 || ids[i] >= self.num_envs())
                throw py::value_error("env id " + std::to_string(ids[i]) + " out of range [0, " +
                                      std::to_string(self.num_envs()) + ")");
              if (seen[ids[i]])
                throw py::value_error("env id " + std::to_string(ids[i]) + " repeats within one add");
              seen[ids[i]] = true;
            }
            std::vector<const uint8_t*> src;
            for (size_t f = 0; f < fields.size(); ++f) {
              auto a = arrays[f].cast<py::array>();
              check_array(a, fields[f], {n}, false, "add");
              src.push_back(static_cast<const uint8_t*>(a.data()));
            }
            py::gil_scoped_release release;
            self.add(ids, n, src);
          },
          py::arg("env_ids"), py::arg("arrays"),
          "Appends rows arrays[f][i] to env env_ids[i]; arrays in spec order, [n, *shape].")
      .def(
          "sample",
          [](ReplayCore& self, int64_t batch, int64_t seq_len, double recency, const py::list& outs,
             py::array_t<int64_t, py::array::c_style> env_out,
             py::array_t<int64_t, py::array::c_style> start_out, int num_threads) {
            const auto& fields = self.fields();
            if (batch <= 0) throw py::value_error("batch_size must be >= 1, got " + std::to_string(batch));
            if (seq_len <= 0) throw py::value_error("seq_len must be >= 1, got " + std::to_string(seq_len));
            if (seq_len > self.env_capacity())
              throw py::value_error("seq_len " + std::to_string(seq_len) + " exceeds the per-env capacity " +
                                    std::to_string(self.env_capacity()));
            if (!(recency >= 0.0 && recency <= 1.0))
              throw py::value_error("recency must be in [0, 1], got " + std::to_string(recency));
            if (py::len(outs) != fields.size()) throw py::value_error("sample expects one output per field");
            if (env_out.ndim() != 1 || env_out.shape(0) != batch || start_out.ndim() != 1 ||
                start_out.shape(0) != batch)
              throw py::value_error("env/start outputs must have shape (batch_size,)");
            std::vector<uint8_t*> dst;
            for (size_t f = 0; f < fields.size(); ++f) {
              auto a = outs[f].cast<py::array>();
              check_array(a, fields[f], {batch, seq_len}, true, "sample output");
              dst.push_back(static_cast<uint8_t*>(a.mutable_data()));
            }
            int64_t* envs = env_out.mutable_data();
            int64_t* starts = start_out.mutable_data();
            py::gil_scoped_release release;
            self.sample(batch, seq_len, recency, dst, envs, starts, num_threads);
          },
          py::arg("batch"), py::arg("seq_len"), py::arg("recency"), py::arg("outs"), py::arg("env_out"),
          py::arg("start_out"), py::arg("num_threads"),
          "Chooses windows and gathers them into outs[f] ([B, T, *shape]) without the GIL.")
      .def(
          "storage",
          [](py::object self_obj, size_t f) {
            auto& self = self_obj.cast<ReplayCore&>();
            const auto& fields = self.fields();
            if (f >= fields.size()) throw py::index_error("field index out of range");
            std::vector<py::ssize_t> shape = {self.num_envs(), self.env_capacity(), fields[f].row_bytes};
            return py::array(py::dtype("B"), shape, self.field_data(f), self_obj);
          },
          py::arg("field"), "Zero-copy uint8 view of one field's storage, [num_envs, env_capacity, row_bytes].")
      .def("seed", &ReplayCore::seed, py::arg("seed"))
      .def("rng_state", [](const ReplayCore& s) { return py::bytes(s.rng_state()); })
      .def("set_rng_state", [](ReplayCore& s, const py::bytes& b) { s.set_rng_state(std::string(b)); });
}

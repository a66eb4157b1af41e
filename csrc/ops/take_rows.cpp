// take_rows: the rows of a small table picked by index, written in place (the action part of norm_silu_cat).
#include "ops/ops.hpp"

namespace fastdream::ops {
namespace {



}  // namespace

// take_rows: out[n] = table[index[n]] for table [A, C] and index [N] int64 (all checked to lie in [0, A) before any
// row is copied) into out [N, C] (checked_out: e.g. a column slice of the array several ops fill in place).
py::array take_rows(const py::array& table, const py::array& index, const py::array& out, bool bfloat16, int threads) {
  check_floats(table, bfloat16, "take_rows", "table");
  if (table.ndim() != 2 || table.shape(0) < 1 || !(table.flags() & py::array::c_style))
    throw py::value_error("take_rows: table " + shape_of(table) + " must be a C-contiguous [A, C] with A >= 1");
  if (!index.dtype().is(py::dtype::of<int64_t>()))
    throw py::type_error("take_rows: index dtype " + std::string(py::str(index.dtype())) + ", expected int64");
  if (index.ndim() != 1 || !(index.flags() & py::array::c_style))
    throw py::value_error("take_rows: index " + shape_of(index) + " must be a contiguous [N]");
  const int64_t n_count = index.shape(0), a_count = table.shape(0), c_count = table.shape(1);
  const int64_t ld = checked_out(out, bfloat16, n_count, c_count, "take_rows");
  const auto* idx = static_cast<const int64_t*>(index.data());
  const int64_t* bad = std::find_if(idx, idx + n_count, [&](int64_t i) { return i < 0 || i >= a_count; });
  if (bad != idx + n_count)
    throw py::index_error("take_rows: index " + std::to_string(*bad) + " outside [0, " + std::to_string(a_count) +
                          ") of table " + shape_of(table));
  const auto* src = static_cast<const char*>(table.data());
  auto* dst = static_cast<char*>(py::array(out).mutable_data());
  const int64_t row_bytes = c_count * table.itemsize(), ld_bytes = ld * table.itemsize();
  const int n = threads_for(threads, n_count, n_count * c_count);
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(n) schedule(static)
    for (int64_t i = 0; i < n_count; ++i) std::memcpy(dst + i * ld_bytes, src + idx[i] * row_bytes, row_bytes);
  }
  return out;
}

}  // namespace fastdream::ops

// The ops fastdream.fast._ops exports, one per file of csrc/ops/ (module.cpp binds them): numpy arrays in and out,
// bfloat16 as 16-bit words (numpy has none), every shape, dtype and index checked before memory is read.
#pragma once

#include "ops/common.hpp"

namespace fastdream::ops {

py::array_t<float> gather_rows_backward(const py::array& g, const py::array& rows, int64_t num_rows, int threads);
py::array_t<int64_t> unimix_index(const py::array& logits, const py::array& noise, double unimix, bool bfloat16,
                                  int threads, const std::optional<py::array>& bias,
                                  const std::optional<py::array>& out_arg);
py::array norm_silu(const py::array& x, const py::array& weight, const py::array& bias, double eps, bool bfloat16,
                    int threads, int64_t groups, const std::optional<py::array>& add,
                    const std::optional<py::array>& add_bias, const std::optional<py::array>& out_arg);
py::array gather_norm_silu(const std::optional<py::array>& dense, const py::array& table, const py::array& rows,
                           const py::array& weight, const py::array& bias, double eps, bool bfloat16, int threads,
                           int64_t classes, const std::optional<py::array>& out_arg);
py::array take_rows(const py::array& table, const py::array& index, const py::array& out, bool bfloat16, int threads);
py::object gru_gate(const py::array& y, const py::array& bias, const py::array& deter, bool bfloat16, int threads,
                    bool copies, const std::optional<py::array>& rows_out);
py::array_t<float> twohot_decode(const py::array& logits, const py::array& bins, bool bfloat16, int threads,
                                 const std::optional<py::array>& bias);

}  // namespace fastdream::ops

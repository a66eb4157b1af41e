// fastdream.fast._ops: the module that binds the C++ ops of csrc/ops/ (one file each) with their docstrings.
#include "ops/ops.hpp"

PYBIND11_MODULE(_ops, m) {
  using namespace fastdream::ops;
  m.doc() = "Small CPU kernels for fastdream's training maths.";
  m.attr("avx512_bf16_supported") = avx512_bf16_supported();
  m.def("avx512_bf16", [] { return avx512_bf16_enabled; },
        "Whether the bfloat16 ops take their AVX512_BF16 paths now (else the portable clones).");
  m.def(
      "set_avx512_bf16",
      [](bool enabled) {
        if (enabled && !avx512_bf16_supported())
          throw py::value_error("set_avx512_bf16(True): this CPU has no AVX512_BF16; only the portable paths run here");
        const bool before = avx512_bf16_enabled;
        avx512_bf16_enabled = enabled;
        return before;
      },
      py::arg("enabled"),
      "Switches the AVX512_BF16 paths on (where the CPU has them) or off (the portable clones); returns the previous\n"
      "setting. Tests run every op on both paths in one process.");
  m.def("gather_rows_backward", &gather_rows_backward, py::arg("g"), py::arg("rows"), py::arg("num_rows"),
        py::arg("threads") = 1,
        "out [num_rows, O] float32: out[rows[m, s]] += g[m] for g [M, O] float32 and rows [M, S] int64.");
  m.def("unimix_index", &unimix_index, py::arg("logits"), py::arg("noise"), py::arg("unimix"),
        py::arg("bfloat16") = false, py::arg("threads") = 1, py::arg("bias") = py::none(), py::arg("out") = py::none(),
        "index [M] int64: inverse-CDF draw from (1 - unimix) softmax(logits) + unimix / K for logits [M, K]\n"
        "(float32, or bfloat16 passed as 16-bit words with bfloat16=True) and one uniform noise [M] float32 per row;\n"
        "bias [P * K] float32 or None: row m's logits plus bias row m % P (a head's bias, one row per latent).\n"
        "out: None, or the contiguous int64 [M] to write (e.g. one step of a stacked sequence).");
  m.def("norm_silu", &norm_silu, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("bfloat16") = false, py::arg("threads") = 1, py::arg("groups") = 1, py::arg("add") = py::none(),
        py::arg("add_bias") = py::none(), py::arg("out") = py::none(),
        "[M, C] of x's dtype: silu(layer_norm(x) * weight + bias) per row of x [M, C] (float32, or bfloat16 as\n"
        "16-bit words with bfloat16=True), weight and bias [C] float32; the maths in float32. groups > 1: the\n"
        "result laid out [G, M, C/G] (column block g of every row together), as a block matmul reads it.\n"
        "add [Ga, M, C/Ga] (x's dtype) and add_bias [C] float32, or None: added to x's rows before the norm.\n"
        "out: None, or the [M, C] array to write (groups = 1; its rows any stride apart: e.g. a column slice).");
  m.def("gather_norm_silu", &gather_norm_silu, py::arg("dense"), py::arg("table"), py::arg("rows"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("bfloat16") = false, py::arg("threads") = 1, py::arg("classes") = 0,
        py::arg("out") = py::none(),
        "[M, C] of table's dtype: silu(layer_norm(dense[m] + sum_s table[rows[m, s]]) * weight + bias) per row m, for\n"
        "table [R, C] and dense [M, C] or None (float32, or bfloat16 as 16-bit words with bfloat16=True), rows [M, S]\n"
        "int64 in [0, R), weight and bias [C] float32; the maths in float32. classes = K > 0: rows hold each latent's\n"
        "class in [0, K) and the table row is s * K + rows[m, s] (R = S * K). out: as norm_silu's.");
  m.def("take_rows", &take_rows, py::arg("table"), py::arg("index"), py::arg("out"), py::arg("bfloat16") = false,
        py::arg("threads") = 1,
        "out: out[n] = table[index[n]] for table [A, C] (float32, or bfloat16 as 16-bit words with bfloat16=True),\n"
        "index [N] int64 in [0, A) and out [N, C] of table's dtype, its rows any stride apart (e.g. a column slice).");
  m.def("twohot_decode", &twohot_decode, py::arg("logits"), py::arg("bins"), py::arg("bfloat16") = false,
        py::arg("threads") = 1, py::arg("bias") = py::none(),
        "[M] float32: symexp(sum_k softmax(logits + bias)_k bins_k) per row of logits [M, K] (float32, or bfloat16\n"
        "as 16-bit words with bfloat16=True) over bins [K] float32; bias [K] float32 or None (the head's bias,\n"
        "added here instead of by an addmm that copied it into every output row on one thread).");
  m.def("gru_gate", &gru_gate, py::arg("y"), py::arg("bias"), py::arg("deter"), py::arg("bfloat16") = false,
        py::arg("threads") = 1, py::arg("copies") = false, py::arg("rows_out") = py::none(),
        "next deter [N, D] float32: the block-GRU update from the block matmul's output y [G, N, 3 D/G] (float32,\n"
        "or bfloat16 as 16-bit words with bfloat16=True) before its bias [3 D] float32, and deter [N, D] float32.\n"
        "copies=True: (deter, its bfloat16 words [N, D], the same [G, N, D/G]) for the next step's matmuls;\n"
        "rows_out: None, or the C-contiguous [N, D] words array to write the first copy into (returned as it).");
}

"""fastdream's C++ kernels (``fastdream._ops``) as torch ops: each ``fastdream::`` op below wraps one kernel for
CPU tensors without gradients, with a fake (shape-only) kernel so a compiled rollout keeps it as one opaque call
(no graph break). ``fastdream.nets`` decides where they stand in for torch ops; its functions of the same names are
the ones to call (they fall back to plain torch elsewhere).
"""

from __future__ import annotations

import torch


def _words(x: torch.Tensor):
    """``x`` as a numpy array for the C++ ops: bfloat16 as 16-bit words (numpy has no bfloat16)."""
    x = x.detach().contiguous()
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


@torch.library.custom_op("fastdream::twohot_decode", mutates_args=())
def twohot_decode(logits: torch.Tensor, bins: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from fastdream import _ops

    return torch.from_numpy(_ops.twohot_decode(_words(logits), bins.contiguous().numpy(),
                                               logits.dtype == torch.bfloat16, torch.get_num_threads(),
                                               None if bias is None else bias.contiguous().numpy()))


@twohot_decode.register_fake
def _(logits: torch.Tensor, bins: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastdream::unimix_index", mutates_args=())
def unimix_index(logits: torch.Tensor, noise: torch.Tensor, unimix: float,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """The C++ kernel as a torch op: a compiled rollout keeps it as one opaque call (no graph break)."""
    from fastdream import _ops

    return torch.from_numpy(_ops.unimix_index(_words(logits), noise.contiguous().numpy(), unimix,
                                              logits.dtype == torch.bfloat16, torch.get_num_threads(),
                                              None if bias is None else bias.contiguous().numpy()))


@unimix_index.register_fake
def _(logits: torch.Tensor, noise: torch.Tensor, unimix: float, bias: torch.Tensor | None) -> torch.Tensor:
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)


@torch.library.custom_op("fastdream::unimix_index_into", mutates_args=("out",))
def unimix_index_into(logits: torch.Tensor, noise: torch.Tensor, unimix: float, bias: torch.Tensor | None,
                      out: torch.Tensor) -> None:
    """``unimix_index`` writing into ``out [M]`` (contiguous int64): a compiled rollout's classes go straight
    into its stacked sequence (inductor keeps the mutated slice in place, no copy)."""
    from fastdream import _ops

    _ops.unimix_index(_words(logits), noise.contiguous().numpy(), unimix, logits.dtype == torch.bfloat16,
                      torch.get_num_threads(), None if bias is None else bias.contiguous().numpy(), out.numpy())


@unimix_index_into.register_fake
def _(logits: torch.Tensor, noise: torch.Tensor, unimix: float, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    return None


@torch.library.custom_op("fastdream::norm_silu", mutates_args=())
def norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, groups: int,
              add: torch.Tensor | None, add_bias: torch.Tensor | None) -> torch.Tensor:
    from fastdream import _ops

    out = _ops.norm_silu(_words(x), weight.contiguous().numpy(), bias.contiguous().numpy(), eps,
                         x.dtype == torch.bfloat16, torch.get_num_threads(), groups,
                         None if add is None else _words(add),
                         None if add_bias is None else add_bias.contiguous().numpy())
    out = torch.from_numpy(out)
    return out.view(torch.bfloat16) if x.dtype == torch.bfloat16 else out


@norm_silu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, groups: int,
      add: torch.Tensor | None, add_bias: torch.Tensor | None) -> torch.Tensor:
    m, c = x.shape
    return x.new_empty(m, c) if groups == 1 else x.new_empty(groups, m, c // groups)


@torch.library.custom_op("fastdream::gru_gate", mutates_args=())
def gru_gate(y: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
    from fastdream import _ops

    return torch.from_numpy(_ops.gru_gate(_words(y), bias.contiguous().numpy(), deter.detach().contiguous().numpy(),
                                          y.dtype == torch.bfloat16, torch.get_num_threads()))


@gru_gate.register_fake
def _(y: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
    return deter.new_empty(deter.shape, dtype=torch.float32)


@torch.library.custom_op("fastdream::gru_gate_into", mutates_args=("rows",))
def gru_gate_into(y: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor, rows: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``gru_gate`` that also writes the new deter rounded to bf16 into ``rows [N, D]`` (contiguous: e.g. a step
    of a compiled rollout's deter sequence, which inductor keeps in place) and returns it grouped ``[G, N, D/G]``."""
    from fastdream import _ops

    out, _, grouped = _ops.gru_gate(_words(y), bias.contiguous().numpy(), deter.detach().contiguous().numpy(), True,
                                    torch.get_num_threads(), True, rows.view(torch.int16).numpy())
    return torch.from_numpy(out), torch.from_numpy(grouped).view(torch.bfloat16)


@gru_gate_into.register_fake
def _(y: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor, rows: torch.Tensor
      ) -> tuple[torch.Tensor, torch.Tensor]:
    g, n, k = y.shape
    return deter.new_empty(deter.shape, dtype=torch.float32), y.new_empty(g, n, k // 3)


@torch.library.custom_op("fastdream::write_into", mutates_args=("out",))
def write_into(src: torch.Tensor, out: torch.Tensor) -> None:
    """``out.copy_(src)`` as one opaque op: a compiled graph's first write into a fresh (``torch.empty``) buffer,
    e.g. step 0 of a stacked sequence whose other steps kernels write in place. As a plain copy inductor
    wrote the whole buffer (the other steps from the uninitialised ``empty``): ~1.8 ms per N=4096 dream."""
    out.copy_(src)


@write_into.register_fake
def _(src: torch.Tensor, out: torch.Tensor) -> None:
    return None


@torch.library.custom_op("fastdream::gather_rows_backward", mutates_args=())
def gather_rows_backward(g: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The C++ kernel as a torch op, so a traced graph (torch.compile) keeps it as one opaque call."""
    from fastdream import _ops

    out = _ops.gather_rows_backward(g.detach().contiguous().numpy(), rows.contiguous().numpy(), num_rows,
                                    torch.get_num_threads())
    return torch.from_numpy(out)


@gather_rows_backward.register_fake
def _(g: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return g.new_empty(num_rows, g.shape[1], dtype=torch.float32)


@torch.library.custom_op("fastdream::gather_norm_silu", mutates_args=())
def gather_norm_silu(dense: torch.Tensor | None, table: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor, eps: float, classes: int = 0) -> torch.Tensor:
    from fastdream import _ops

    out = _ops.gather_norm_silu(None if dense is None else _words(dense), _words(table), rows.contiguous().numpy(),
                                weight.contiguous().numpy(), bias.contiguous().numpy(), eps,
                                table.dtype == torch.bfloat16, torch.get_num_threads(), classes)
    out = torch.from_numpy(out)
    return out.view(torch.bfloat16) if table.dtype == torch.bfloat16 else out


@gather_norm_silu.register_fake
def _(dense: torch.Tensor | None, table: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
      eps: float, classes: int = 0) -> torch.Tensor:
    return table.new_empty(rows.shape[0], table.shape[1])


@torch.library.custom_op("fastdream::norm_silu_cat", mutates_args=())
def norm_silu_cat(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, table: torch.Tensor,
                  index: torch.Tensor, classes: int, table_weight: torch.Tensor, table_bias: torch.Tensor,
                  table_eps: float, rows_table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    from fastdream import _ops

    c0, c1 = x.shape[1], table.shape[1]
    out = x.new_empty(x.shape[0], c0 + c1 + rows_table.shape[1])
    words, bf16, threads = _words(out), x.dtype == torch.bfloat16, torch.get_num_threads()
    _ops.norm_silu(_words(x), weight.contiguous().numpy(), bias.contiguous().numpy(), eps, bf16, threads,
                   out=words[:, :c0])
    _ops.gather_norm_silu(None, _words(table), index.contiguous().numpy(), table_weight.contiguous().numpy(),
                          table_bias.contiguous().numpy(), table_eps, bf16, threads, classes, out=words[:, c0: c0 + c1])
    _ops.take_rows(_words(rows_table), rows.contiguous().numpy(), words[:, c0 + c1:], bf16, threads)
    return out


@norm_silu_cat.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, table: torch.Tensor,
      index: torch.Tensor, classes: int, table_weight: torch.Tensor, table_bias: torch.Tensor,
      table_eps: float, rows_table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1] + table.shape[1] + rows_table.shape[1])

"""fastdream's C++ kernels (``fastdream.fast._ops``, one file each in csrc/ops/) as torch ops: each ``fastdream::``
op below wraps one kernel for CPU tensors without gradients, with a fake (shape-only) kernel so a compiled rollout
keeps it as one opaque call (no graph break). ``fastdream.model.nets`` decides where they stand in for the plain maths
of ``fastdream.model.maths``; its functions of the same names are the ones to call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_ENABLED = [True]


def kernels_enabled() -> bool:
    """Whether call sites may use these kernels (``kernels(False)`` turns them off: the eager dream engine runs the
    plain maths only, the reference every other engine is tested against)."""
    return _ENABLED[0]


@contextmanager
def kernels(enabled: bool) -> Iterator[None]:
    """Within the block, call sites use these kernels (``True``) or only their plain-torch maths (``False``)."""
    before = _ENABLED[0]
    _ENABLED[0] = enabled
    try:
        yield
    finally:
        _ENABLED[0] = before


def set_avx512_bf16(enabled: bool) -> bool:
    """Switches the kernels' AVX512_BF16 paths on (where the CPU has them) or off (the portable paths every CPU
    runs); returns the previous setting. Tests run every op on both."""
    from fastdream.fast import _ops

    return _ops.set_avx512_bf16(enabled)

_LIB = torch.library.Library("fastdream", "DEF")


def _op(mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], torch._ops.OpOverload]:
    """Defines ``fastdream::<fn's name>`` (its schema from fn's type hints) with fn as its CPU kernel; returns the
    op. A plain library kernel: ``torch.library.custom_op``'s wrapper (an autograd layer, argument defaults filled
    in Python, a dynamo-disabled frame) cost ~6 µs per call, ~130 calls per N=4096 dream."""
    def define(fn: Callable) -> torch._ops.OpOverload:
        name = fn.__name__
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIB.impl(name, fn, "CPU")
        return getattr(torch.ops.fastdream, name).default
    return define


def _fake(op: torch._ops.OpOverload) -> Callable[[Callable], Callable]:
    """Registers the decorated function as ``op``'s fake (shape-only) kernel, for tracing."""
    return lambda fn: torch.library.register_fake(op, fn, lib=_LIB)


def _words(x: torch.Tensor):
    """``x`` as a numpy array for the C++ ops: bfloat16 as 16-bit words (numpy has no bfloat16)."""
    x = x.detach().contiguous()
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


@_op()
def twohot_decode(logits: torch.Tensor, bins: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from fastdream.fast import _ops

    return torch.from_numpy(_ops.twohot_decode(_words(logits), bins.contiguous().numpy(),
                                               logits.dtype == torch.bfloat16, torch.get_num_threads(),
                                               None if bias is None else bias.contiguous().numpy()))


@_fake(twohot_decode)
def _(logits: torch.Tensor, bins: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


@_op()
def unimix_index(logits: torch.Tensor, noise: torch.Tensor, unimix: float,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """The C++ kernel as a torch op: a compiled rollout keeps it as one opaque call (no graph break)."""
    from fastdream.fast import _ops

    return torch.from_numpy(_ops.unimix_index(_words(logits), noise.contiguous().numpy(), unimix,
                                              logits.dtype == torch.bfloat16, torch.get_num_threads(),
                                              None if bias is None else bias.contiguous().numpy()))


@_fake(unimix_index)
def _(logits: torch.Tensor, noise: torch.Tensor, unimix: float, bias: torch.Tensor | None) -> torch.Tensor:
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)


@_op(mutates_args=("out",))
def unimix_index_into(logits: torch.Tensor, noise: torch.Tensor, unimix: float, bias: torch.Tensor | None,
                      out: torch.Tensor) -> None:
    """``unimix_index`` writing into ``out [M]`` (contiguous int64): a compiled rollout's classes go straight
    into its stacked sequence (inductor keeps the mutated slice in place, no copy)."""
    from fastdream.fast import _ops

    _ops.unimix_index(_words(logits), noise.contiguous().numpy(), unimix, logits.dtype == torch.bfloat16,
                      torch.get_num_threads(), None if bias is None else bias.contiguous().numpy(), out.numpy())


@_fake(unimix_index_into)
def _(logits: torch.Tensor, noise: torch.Tensor, unimix: float, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    return None


@_op()
def norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, groups: int,
              add: torch.Tensor | None, add_bias: torch.Tensor | None) -> torch.Tensor:
    from fastdream.fast import _ops

    out = _ops.norm_silu(_words(x), weight.contiguous().numpy(), bias.contiguous().numpy(), eps,
                         x.dtype == torch.bfloat16, torch.get_num_threads(), groups,
                         None if add is None else _words(add),
                         None if add_bias is None else add_bias.contiguous().numpy())
    out = torch.from_numpy(out)
    return out.view(torch.bfloat16) if x.dtype == torch.bfloat16 else out


@_fake(norm_silu)
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, groups: int,
      add: torch.Tensor | None, add_bias: torch.Tensor | None) -> torch.Tensor:
    m, c = x.shape
    return x.new_empty(m, c) if groups == 1 else x.new_empty(groups, m, c // groups)


@_op()
def gru_gate(y: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
    from fastdream.fast import _ops

    return torch.from_numpy(_ops.gru_gate(_words(y), bias.contiguous().numpy(), deter.detach().contiguous().numpy(),
                                          y.dtype == torch.bfloat16, torch.get_num_threads()))


@_fake(gru_gate)
def _(y: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
    return deter.new_empty(deter.shape, dtype=torch.float32)


@_op(mutates_args=("rows",))
def gru_gate_into(y: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor, rows: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``gru_gate`` that also writes the new deter rounded to bf16 into ``rows [N, D]`` (contiguous: e.g. a step
    of a compiled rollout's deter sequence, which inductor keeps in place) and returns it grouped ``[G, N, D/G]``."""
    from fastdream.fast import _ops

    out, _, grouped = _ops.gru_gate(_words(y), bias.contiguous().numpy(), deter.detach().contiguous().numpy(), True,
                                    torch.get_num_threads(), True, rows.view(torch.int16).numpy())
    return torch.from_numpy(out), torch.from_numpy(grouped).view(torch.bfloat16)


@_fake(gru_gate_into)
def _(y: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor, rows: torch.Tensor
      ) -> tuple[torch.Tensor, torch.Tensor]:
    g, n, k = y.shape
    return deter.new_empty(deter.shape, dtype=torch.float32), y.new_empty(g, n, k // 3)


@_op(mutates_args=("out",))
def write_into(src: torch.Tensor, out: torch.Tensor) -> None:
    """``out.copy_(src)`` as one opaque op: a compiled graph's first write into a fresh (``torch.empty``) buffer,
    e.g. step 0 of a stacked sequence whose other steps kernels write in place. As a plain copy inductor
    wrote the whole buffer (the other steps from the uninitialised ``empty``): ~1.8 ms per N=4096 dream."""
    out.copy_(src)


@_fake(write_into)
def _(src: torch.Tensor, out: torch.Tensor) -> None:
    return None


@_op()
def gather_rows_backward(g: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The C++ kernel as a torch op, so a traced graph (torch.compile) keeps it as one opaque call."""
    from fastdream.fast import _ops

    out = _ops.gather_rows_backward(g.detach().contiguous().numpy(), rows.contiguous().numpy(), num_rows,
                                    torch.get_num_threads())
    return torch.from_numpy(out)


@_fake(gather_rows_backward)
def _(g: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return g.new_empty(num_rows, g.shape[1], dtype=torch.float32)


@_op()
def gather_norm_silu(dense: torch.Tensor | None, table: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor, eps: float, classes: int = 0) -> torch.Tensor:
    from fastdream.fast import _ops

    out = _ops.gather_norm_silu(None if dense is None else _words(dense), _words(table), rows.contiguous().numpy(),
                                weight.contiguous().numpy(), bias.contiguous().numpy(), eps,
                                table.dtype == torch.bfloat16, torch.get_num_threads(), classes)
    out = torch.from_numpy(out)
    return out.view(torch.bfloat16) if table.dtype == torch.bfloat16 else out


@_fake(gather_norm_silu)
def _(dense: torch.Tensor | None, table: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
      eps: float, classes: int = 0) -> torch.Tensor:
    return table.new_empty(rows.shape[0], table.shape[1])


@_op()
def norm_silu_cat(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, table: torch.Tensor,
                  index: torch.Tensor, classes: int, table_weight: torch.Tensor, table_bias: torch.Tensor,
                  table_eps: float, rows_table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    from fastdream.fast import _ops

    c0, c1 = x.shape[1], table.shape[1]
    out = x.new_empty(x.shape[0], c0 + c1 + rows_table.shape[1])
    words, bf16, threads = _words(out), x.dtype == torch.bfloat16, torch.get_num_threads()
    _ops.norm_silu(_words(x), weight.contiguous().numpy(), bias.contiguous().numpy(), eps, bf16, threads,
                   out=words[:, :c0])
    _ops.gather_norm_silu(None, _words(table), index.contiguous().numpy(), table_weight.contiguous().numpy(),
                          table_bias.contiguous().numpy(), table_eps, bf16, threads, classes, out=words[:, c0: c0 + c1])
    _ops.take_rows(_words(rows_table), rows.contiguous().numpy(), words[:, c0 + c1:], bf16, threads)
    return out


@_fake(norm_silu_cat)
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, table: torch.Tensor,
      index: torch.Tensor, classes: int, table_weight: torch.Tensor, table_bias: torch.Tensor,
      table_eps: float, rows_table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1] + table.shape[1] + rows_table.shape[1])

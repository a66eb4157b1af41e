"""One imagined step of a no-grad dream on one-hot stoch, with the hot path's machinery built once per rollout.

``RSSM.img_step`` is the step as the paper writes it (deter, stoch, action → deter, a prior draw). A no-grad dream
runs the same maths on the stoch's class indices, and keeps what every step would otherwise rebuild: the block
GRU's first-layer weights as its matmuls read them, the stoch layer's gather table, and under autocast the deter's
low-precision copies, which the gate kernel writes as it rounds, straight into the rollout's time-major sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdream.model.nets import gru_gate_grouped, norm_silu_cat, onehot_norm_silu, unimix_index
from fastdream.model.rssm import RSSM

# The GRU's action input: ``action_input(action)`` [N, H], or ``(action_table(A), classes [N])``, the rows of it.
ActionIn = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class DreamStep:
    """``step(deter, index, action_in, noise, out)`` → ``(deter [N, D], index [N, S])``: the next deter (float32)
    and the classes drawn from its prior, as ``RSSM.img_step`` on ``one_hot(index)``.

    ``stoch_table``: ``RSSM.stoch_table()``. ``low``: under autocast, the start deter in the matmuls' dtype as they
    read it, ``([N, D], [G, N, D/G])``; each step then carries the new deter's copies (``self.low``), written by the
    gate kernel as it rounds (one pass, where casts wrote four copies per step), and ``out = ([N, D], [N, S])``
    (one step of the time-major sequences) receives the ``[N, D]`` copy and the drawn classes in place.
    """

    def __init__(self, rssm: RSSM, stoch_table: torch.Tensor,
                 low: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.rssm, self.stoch_table, self.low = rssm, stoch_table, low
        # Built once for the H steps: per step, a compiled rollout re-permuted the shared part ([3H, D]) every step.
        self.weights = rssm.dynhid_weights()

    def __call__(self, deter: torch.Tensor, index: torch.Tensor, action_in: ActionIn, noise: torch.Tensor,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rssm, low = self.rssm, self.low
        if low is not None and isinstance(action_in, tuple):
            # The three parts of the GRU's input written into one array by their kernels (nets.norm_silu_cat).
            x = norm_silu_cat(F.linear(low[0], rssm.dynin_deter[0].weight), rssm.dynin_deter[1], self.stoch_table,
                              index, rssm.classes, rssm.dynin_stoch[1], *action_in)
        else:
            if isinstance(action_in, tuple):
                action_in = action_in[0][action_in[1]]
            none = index.new_empty(index.shape[0], 0, dtype=self.stoch_table.dtype)  # the layer is all one-hot
            stoch_in = onehot_norm_silu(none, rssm.dynin_stoch[0].weight, rssm.dynin_stoch[1], index, rssm.classes,
                                        self.stoch_table)
            x = torch.cat([rssm.dynin_deter(deter if low is None else low[0]), stoch_in, action_in], -1)
        y = torch.bmm(rssm.block_input(deter, x, self.weights, None if low is None else low[1]), rssm.gru.weight)
        if low is None:
            deter = gru_gate_grouped(y, rssm.gru.bias, deter)
            return deter, self.prior_index(deter, noise)
        deter, rows, grouped = gru_gate_grouped(y, rssm.gru.bias, deter, True, None if out is None else out[0])
        self.low = (rows, grouped)
        return deter, self.prior_index(rows, noise, None if out is None else out[1])

    def prior_index(self, features_in: torch.Tensor, noise: torch.Tensor,
                    index_out: torch.Tensor | None = None) -> torch.Tensor:
        """Classes ``[N, S]`` drawn from the prior of the new deter, read as ``features_in`` (its low-precision copy
        under autocast), its head's bias added by the draw; written into ``index_out`` where given."""
        rssm = self.rssm
        return unimix_index(rssm.prior_unbiased(features_in), noise, rssm.unimix, rssm.prior_net.head.bias, index_out)

"""The imagination step's maths in plain fp32 torch: the oracle for kernels/rssm_step.py.

Names match the kernels one to one: ``gru_gate``, ``unimix_sample``, ``rssm_step``.
"""

from __future__ import annotations

import torch

from fastdream.model import maths


def gru_gate_reference(x: torch.Tensor, deter: torch.Tensor, groups: int) -> torch.Tensor:
    """Block-GRU gate maths (``fastdream.model.maths.gru_gate``): ``x [N, 3D]`` laid out ``[N, G, 3, D/G]``,
    ``deter [N, D]`` → next deter ``[N, D]``."""
    return maths.gru_gate(x, deter, groups)


def unimix_sample_reference(logits: torch.Tensor, noise: torch.Tensor, unimix: float) -> tuple[torch.Tensor, ...]:
    """Unimix + straight-through inverse-CDF sample of categoricals ``logits [N, S, K]``.

    ``noise [N, S]`` uniform in [0, 1). Returns ``(mixed_logits [N, S, K], sample [N, S, K], index [N, S])``
    where mixed = log((1 − unimix) softmax(logits) + unimix / K), sample = onehot(index) + p − sg(p).
    """
    probs = maths.unimix_probs(logits.float(), unimix)
    return probs.log(), *maths.straight_through_draw(probs, noise.float())


def rssm_step_reference(rssm, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor,
                        noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prior (imagination) step of ``fastdream.model.rssm.RSSM``: ``(deter, stoch, prior_logits, index)``."""
    return rssm.img_step(deter, stoch, action, noise)

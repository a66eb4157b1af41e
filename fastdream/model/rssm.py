"""RSSM with a block GRU (DreamerV3): deterministic state h ``[N, D]``, stochastic z ``[N, S, K]``.

h_t = core(h_{t-1}, z_{t-1}, a_{t-1}); prior p(z_t | h_t); posterior q(z_t | h_t, e_t).
Rows store the action that led to them, so row t's ``action`` is exactly a_{t-1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdream.fast import runtime
from fastdream.model.maths import onehot, straight_through_draw, unimix_logits, unimix_probs
from fastdream.model.nets import (
    MLP,
    BlockLinear,
    Norm,
    Stack,
    gru_gate_grouped,
    norm_silu,
    onehot_table,
    unimix_index,
)


class RSSM(nn.Module):
    """Recurrent state-space model; all state tensors are plain ``(deter, stoch)`` pairs."""

    def __init__(self, action_dim: int, embed_dim: int, deter: int = 128, hidden: int = 128,
                 stoch: int = 32, classes: int = 16, blocks: int = 8, unimix: float = 0.01,
                 dyn_layers: int = 1) -> None:
        super().__init__()
        if deter % blocks:
            raise ValueError(f"deter {deter} must be divisible by blocks {blocks}")
        self.deter, self.hidden, self.stoch, self.classes, self.blocks = deter, hidden, stoch, classes, blocks
        self.unimix = unimix
        # Posterior steps per compiled graph (``observe``). xs train step B16×T64, compile bf16, interleaved:
        # 0.628 s median with 1, 0.604 with 4, 0.582 with 8, 8 and 16 equal (0.555/0.558); compiling 8 takes longer.
        self.obs_chunk = 8
        self.feat_dim = deter + stoch * classes
        self.dynin_deter = Stack(nn.Linear(deter, hidden, bias=False), Norm(hidden), nn.SiLU())
        self.dynin_stoch = Stack(nn.Linear(stoch * classes, hidden, bias=False), Norm(hidden), nn.SiLU())
        self.dynin_action = Stack(nn.Linear(action_dim, hidden, bias=False), Norm(hidden), nn.SiLU())
        group_in = deter // blocks + 3 * hidden
        layers: list[nn.Module] = []
        for _ in range(dyn_layers):
            layers += [BlockLinear(blocks * group_in, deter, blocks), Norm(deter), nn.SiLU()]
            group_in = deter // blocks
        self.dynhid = Stack(*layers)
        self.gru = BlockLinear(deter, 3 * deter, blocks)
        self.prior_net = MLP(deter, hidden, 1, stoch * classes)
        self.post_net = MLP(deter + embed_dim, hidden, 1, stoch * classes)

    # ---------------------------------------------------------------- pieces
    def initial(self, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Zero state: ``([n, D], [n, S, K])``."""
        return (torch.zeros(n, self.deter, device=device),
                torch.zeros(n, self.stoch, self.classes, device=device))

    def feat(self, deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
        """``[..., D]``, ``[..., S, K]`` → ``[..., D + S·K]``."""
        return torch.cat([deter, stoch.flatten(-2)], -1)

    def action_input(self, action: torch.Tensor) -> torch.Tensor:
        """``[..., A]`` → the GRU's action input ``[..., H]`` (actions scaled into [-1, 1] first)."""
        return self.dynin_action(action / action.abs().clamp(min=1.0).detach())

    def gru_input(self, deter: torch.Tensor, stoch_in: torch.Tensor, action_in: torch.Tensor,
                  weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The block GRU's input laid out for its block matmul ``[G, N, D/G]``, from deter ``[N, D]`` and the stoch
        and action inputs ``[N, H]`` (``dynin_stoch``'s and ``action_input``'s outputs). ``weights``:
        ``dynhid_weights()`` built already."""
        x = torch.cat([self.dynin_deter(deter), stoch_in, action_in], -1)
        return self.block_input(deter, x, weights)

    def block_input(self, deter: torch.Tensor, x: torch.Tensor,
                    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                    deter_grouped: torch.Tensor | None = None) -> torch.Tensor:
        """dynhid on group inputs ``[deter_g ‖ x]`` (``x [N, 3H]``, the three inputs, shared by the G groups),
        laid out ``[G, N, D/G]`` for the GRU's block matmul. ``deter_grouped``: deter as ``[G, N, D/G]`` already."""
        if len(self.dynhid) == 3:  # one layer: its Norm and SiLU sum its parts and write the grouped layout
            own, shared = self.dynhid_parts(deter, x, weights, deter_grouped)
            return norm_silu(shared, self.dynhid[1], self.blocks, own, self.dynhid[0].bias)
        h = self.dynhid[1:](self.dynhid_first(deter, x, weights))
        return h.reshape(-1, self.blocks, self.deter // self.blocks).transpose(0, 1).contiguous()

    def gru_step(self, deter: torch.Tensor, stoch: torch.Tensor, action_in: torch.Tensor,
                 weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The next deter ``[N, D]`` from ``stoch [N, S, K]`` and ``action_in = action_input(action)``: the block
        GRU's gate maths on its block matmul's output, its bias fused in (``nets.gru_gate_grouped``)."""
        return self.gru_next(deter, self.dynin_stoch(stoch.flatten(-2)), action_in, weights)

    def gru_next(self, deter: torch.Tensor, stoch_in: torch.Tensor, action_in: torch.Tensor,
                 weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``gru_step`` from the stoch input ``stoch_in = dynin_stoch(stoch) [N, H]`` (a one-hot dream gathers it:
        ``nets.onehot_norm_silu``)."""
        y = torch.bmm(self.gru_input(deter, stoch_in, action_in, weights), self.gru.weight)
        return gru_gate_grouped(y, self.gru.bias, deter)

    def gate_inputs(self, deter: torch.Tensor, stoch: torch.Tensor, action_in: torch.Tensor) -> torch.Tensor:
        """The block GRU's gate pre-activations ``[N, 3D]`` (laid out ``[N, G, 3, D/G]``, bias included), for a
        fused gate kernel (``kernels.rssm_step``)."""
        y = torch.bmm(self.gru_input(deter, self.dynin_stoch(stoch.flatten(-2)), action_in), self.gru.weight)
        return y.transpose(0, 1).reshape(deter.shape[0], -1) + self.gru.bias

    def dynhid_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first dynhid layer's weight split as ``dynhid_first`` reads it: ``own [G, D/G, D/G]`` and
        ``shared [3H, D]`` (a copy, columns group-major). A sequence loop builds them once, not per step."""
        w = self.dynhid[0].weight  # [G, D/G + 3H, D/G]
        dg = self.deter // self.blocks
        return w[:, :dg], w[:, dg:].permute(1, 0, 2).reshape(w.shape[1] - dg, -1)

    def dynhid_first(self, deter: torch.Tensor, x: torch.Tensor,
                     weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The first dynhid BlockLinear on group inputs ``[deter_g ‖ x]`` (x ``[N, 3H]`` shared by all G
        groups), without building them: ``blockwise(deter, W_own) + x @ W_shared`` → ``[N, D]``.
        Materialising the G-fold ``[N, G, D/G + 3H]`` input cost ~45 % of an eager imagination step."""
        own, shared = self.dynhid_parts(deter, x, weights)
        # The bias in the matmuls' dtype: a float32 bias made the sum, its Norm+SiLU and the GRU's input float32.
        return own.transpose(0, 1).reshape(*deter.shape[:-1], -1) + shared + self.dynhid[0].bias.to(own.dtype)

    def dynhid_parts(self, deter: torch.Tensor, x: torch.Tensor,
                     weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                     grouped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``dynhid_first`` before its sum: the blockwise part as the bmm leaves it ``[G, N, D/G]`` and
        ``x @ W_shared`` ``[N, D]`` (no bias). ``grouped``: deter laid out ``[G, N, D/G]`` already."""
        own_w, shared_w = weights if weights is not None else self.dynhid_weights()
        g, dg = self.blocks, self.deter // self.blocks
        if grouped is None:
            grouped = deter.reshape(-1, g, dg).transpose(0, 1).contiguous()
        own = torch.bmm(grouped, own_w)  # [G, N, D/G]
        return own, x @ shared_w

    def core(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """h_t = f(h_{t-1}, z_{t-1}, a_{t-1}): ``[N, D], [N, S, K], [N, A]`` → next deter ``[N, D]``."""
        return self.gru_step(deter, stoch, self.action_input(action))

    def action_table(self, actions: int) -> torch.Tensor:
        """``action_input`` of each one-hot action ``[A, H]``: the GRU's action input of a one-hot action is row
        ``argmax`` of it (the same row maths, so the same values). A discrete-action rollout builds it once and
        gathers rows instead of a matmul, a LayerNorm+SiLU and the scaling per step (~0.27 ms per N=4096 step)."""
        return self.action_input(torch.eye(actions, device=self.dynin_action[0].weight.device))

    def stoch_table(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stoch input layer's gather table in ``dtype`` (``nets.onehot_table``): a rollout builds it once."""
        return onehot_table(self.dynin_stoch[0].weight, self.stoch * self.classes, dtype)

    def prior_raw(self, deter: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` → prior logits before unimix ``[N, S, K]``."""
        return self.prior_net(deter).reshape(*deter.shape[:-1], self.stoch, self.classes)

    def prior_logits(self, deter: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` → unimix prior logits ``[N, S, K]``."""
        return unimix_logits(self.prior_raw(deter), self.unimix)

    # ---------------------------------------------------------------- steps
    def img_step(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One imagined step from the prior: ``(deter [N, D], stoch [N, S, K], prior_logits [N, S, K], index [N, S])``,
        ``index`` the classes of the new ``stoch`` sample (``noise [N, S]`` uniform, fresh if None)."""
        deter = self.core(deter, stoch, action)
        return (deter, *self.prior_draw(deter, noise))

    def prior_unbiased(self, deter: torch.Tensor) -> torch.Tensor:
        """The prior head's logits ``[N, S, K]`` before its output bias: the draws add it as they read a row (an
        addmm copied the bias into all N rows on one thread). ``deter`` may be its low-precision copy."""
        return F.linear(self.prior_net.features(deter), self.prior_net.head.weight).reshape(
            *deter.shape[:-1], self.stoch, self.classes)

    def prior_draw(self, deter: torch.Tensor, noise: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A draw from the prior of ``deter [N, D]``: ``(stoch, prior_logits, index [N, S])``; straight-through where
        a gradient flows, else drawn from the logits in one pass (``nets.unimix_index``)."""
        unbiased = self.prior_unbiased(deter)
        head = self.prior_net.head
        raw = unbiased + head.bias.reshape(self.stoch, self.classes)
        probs = unimix_probs(raw, self.unimix)
        if noise is None:
            noise = torch.rand(probs.shape[:-1], device=probs.device, dtype=probs.dtype)
        if probs.requires_grad:
            stoch, index = straight_through_draw(probs, noise)
        else:
            index = unimix_index(unbiased, noise, self.unimix, head.bias)
            stoch = onehot(index, self.classes, probs.dtype)
        return stoch, probs.log(), index

    def obs_step(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, embed: torch.Tensor,
                 is_first: torch.Tensor, noise: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One posterior step; ``is_first [N]`` resets the carry (and zeroes the action) first.

        Returns ``(deter, stoch, post_logits)``; the prior of ``deter`` is ``prior_logits(deter)``.
        """
        keep = (~is_first).to(deter.dtype)
        action_in = self.action_input(action * keep[:, None])
        return self._obs_step(deter, stoch, keep, action_in, self.embed_proj(embed), self._step_weights(), noise)

    def embed_proj(self, embed: torch.Tensor) -> torch.Tensor:
        """``[..., E]`` → the embedding's share of the posterior's first layer ``[..., hidden]``."""
        return F.linear(embed, self.post_net.body[0].weight[:, self.deter:])

    def _step_weights(self) -> tuple[torch.Tensor, ...]:
        """Weights every posterior step reads in a sliced layout: ``dynhid_weights()`` and the deter
        columns of the posterior's first layer. Sliced once per sequence, so autograd sums one weight
        gradient per sequence into each parameter instead of one slice-backward per step."""
        return (*self.dynhid_weights(), self.post_net.body[0].weight[:, : self.deter])

    def _obs_step(self, deter: torch.Tensor, stoch: torch.Tensor, keep: torch.Tensor, action_in: torch.Tensor,
                  embed_proj: torch.Tensor, weights: tuple[torch.Tensor, ...], noise: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``obs_step`` on inputs prepared outside the recurrence: ``keep [N]`` (0 resets), ``action_in``
        (``action_input`` of the kept action), ``embed_proj`` (``embed_proj(embed)``), ``_step_weights()``."""
        deter = deter * keep[:, None]
        stoch = stoch * keep[:, None, None]
        deter = self.gru_step(deter, stoch, action_in, weights[:2])
        x = F.linear(deter, weights[2]) + embed_proj
        x = self.post_net.head(self.post_net.body[1:](x))
        probs = unimix_probs(x.reshape(*deter.shape[:-1], self.stoch, self.classes), self.unimix)
        if noise is None:
            noise = torch.rand(probs.shape[:-1], device=probs.device, dtype=probs.dtype)
        return deter, straight_through_draw(probs, noise)[0], probs.log()

    def _obs_steps(self, deter: torch.Tensor, stoch: torch.Tensor, keep: torch.Tensor, action_in: torch.Tensor,
                   embed_proj: torch.Tensor, weights: tuple[torch.Tensor, ...], noise: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``_obs_step`` over the ``k`` steps of ``keep [B, k]``, ``action_in``/``embed_proj [B, k, ·]``,
        ``noise [B, k, S]``: the last ``(deter, stoch)`` and the per-step deters, stochs and posteriors."""
        deters, stochs, posts = [], [], []
        for i in range(keep.shape[1]):
            deter, stoch, post = self._obs_step(deter, stoch, keep[:, i], action_in[:, i], embed_proj[:, i], weights,
                                                None if noise is None else noise[:, i])
            deters.append(deter)
            stochs.append(stoch)
            posts.append(post)
        return deter, stoch, deters, stochs, posts

    def observe(self, embed: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor,
                state: tuple[torch.Tensor, torch.Tensor] | None = None, noise: torch.Tensor | None = None,
                compiled: bool = False) -> dict[str, torch.Tensor]:
        """Posterior over a sequence: ``embed [B, T, E]``, ``action [B, T, A]``, ``is_first [B, T]``;
        ``noise [B, T, S]`` uniform draws for the samples (fresh ones if None). ``compiled``: every ``obs_chunk``
        steps run as one torch.compile graph (forward and backward), a remainder step by step.

        Returns ``deter [B, T, D]``, ``stoch [B, T, S, K]``, ``post``/``prior`` logits ``[B, T, S, K]``.
        """
        # Compiled: a B=16 step is ~40 small ops whose dispatch and autograd overhead is most of the
        # world-model update; inductor fuses them into a few kernels, forward and backward. Its random
        # draws come from inductor's generator: equal to eager in distribution, or exactly for fed noise.
        # ``obs_chunk`` steps run as one graph: fewer graph calls, and autograd sums each weight's
        # gradient once per chunk instead of once per step.
        B, T = embed.shape[:2]
        deter, stoch = state if state is not None else self.initial(B, embed.device)
        # Whatever needs no recurrence runs once for all T: the embedding's share of the posterior's
        # first layer, the action input, the prior (after the loop) and the weight slices.
        keep = (~is_first).to(deter.dtype)
        embed_proj = self.embed_proj(embed)
        action_in = self.action_input(action * keep[..., None])
        weights = self._step_weights()
        deters, stochs, posts = [], [], []
        t = 0
        while t < T:
            k = self.obs_chunk if compiled and T - t >= self.obs_chunk else 1
            steps = runtime.compiled(self, f"obs_steps {k}", self._obs_steps) if compiled else self._obs_steps
            part = slice(t, t + k)
            deter, stoch, d, s, p = steps(deter, stoch, keep[:, part], action_in[:, part], embed_proj[:, part],
                                          weights, None if noise is None else noise[:, part])
            deters += d
            stochs += s
            posts += p
            t += k
        deter = torch.stack(deters, 1)
        return {"deter": deter, "stoch": torch.stack(stochs, 1), "post": torch.stack(posts, 1),
                "prior": self.prior_logits(deter)}

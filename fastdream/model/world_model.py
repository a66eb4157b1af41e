"""World model: encoder + RSSM + heads (decoders, reward, continue) and its loss on a replay batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdream.fast import runtime
from fastdream.model.maths import kl_losses, symlog, twohot_bins, twohot_loss
from fastdream.model.nets import MLP, Hot, ImageDecoder, ImageEncoder, twohot_decode
from fastdream.model.rssm import RSSM

# DreamerV3 loss scales: reconstruction/reward/continue 1, dynamics 0.5, representation 0.1.
LOSS_SCALES = {"rec": 1.0, "reward": 1.0, "cont": 1.0, "dyn": 0.5, "rep": 0.1}
FREE_NATS = 1.0


class WorldModel(nn.Module):
    """Encodes observations, models latent dynamics, predicts obs, reward and continuation.

    Args:
        vector_dim: size of the vector observation (0 for none).
        image: whether 64×64×3 images are observed.
        action_dim: size of the stored action (one-hot or continuous).
    """

    def __init__(self, vector_dim: int, image: bool, action_dim: int, deter: int = 128, hidden: int = 128,
                 stoch: int = 32, classes: int = 16, blocks: int = 8, units: int = 128, layers: int = 1,
                 cnn_mult: int = 16, unimix: float = 0.01, num_bins: int = 255) -> None:
        super().__init__()
        if vector_dim <= 0 and not image:
            raise ValueError("the world model needs a vector observation, an image, or both")
        self.vector_dim, self.image, self.action_dim = vector_dim, image, action_dim
        embed = 0
        if vector_dim:
            self.vec_enc = MLP(vector_dim, units, layers)
            embed += units
        if image:
            self.img_enc = ImageEncoder(cnn_mult)
            embed += self.img_enc.out_dim
        self.rssm = RSSM(action_dim, embed, deter, hidden, stoch, classes, blocks, unimix)
        f = self.rssm.feat_dim
        if vector_dim:
            self.vec_dec = MLP(f, units, layers, vector_dim)
        if image:
            self.img_dec = ImageDecoder(f, cnn_mult)
        self.reward_head = MLP(f, units, layers, num_bins, zero_out=True)
        self.cont_head = MLP(f, units, layers, 1)
        self.register_buffer("bins", twohot_bins(num_bins), persistent=False)

    def encode(self, obs: dict[str, torch.Tensor], compiled: bool = False) -> torch.Tensor:
        """``{vector [..., V], image [..., 64, 64, 3]}`` → embedding ``[..., E]`` (``compiled``: the
        image encoder runs as a compiled graph)."""
        parts = []
        if self.vector_dim:
            parts.append(self.vec_enc(symlog(obs["vector"])))
        if self.image:
            enc = runtime.compiled(self.img_enc, "forward", self.img_enc) if compiled else self.img_enc
            parts.append(enc(obs["image"]))
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def reward(self, feat: torch.Tensor, hot: Hot | None = None) -> torch.Tensor:
        """Predicted reward ``[...]`` from features ``[..., F]`` (``hot``: see ``MLP.forward``). The output
        layer's bias is added by the decode: as an addmm's it was copied into every row on one thread."""
        head = self.reward_head.head
        return twohot_decode(F.linear(self.reward_head.features(feat, hot), head.weight), self.bins, head.bias)

    def cont(self, feat: torch.Tensor, hot: Hot | None = None) -> torch.Tensor:
        """Predicted probability of continuing ``[...]`` (float32; the bias added outside the matmul, as in
        ``reward``)."""
        head = self.cont_head.head
        logit = F.linear(self.cont_head.features(feat, hot), head.weight).squeeze(-1).float() + head.bias
        return torch.sigmoid(logit)

    def rec_image(self, feat: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Image reconstruction loss ``[]``: squared error of the decoded ``feat [B, T, F]`` against
        ``image [B, T, 64, 64, 3]`` uint8 (centred: pixels/255 − 0.5), summed per image, mean over images."""
        target = image.float() / 255.0 - 0.5
        return ((self.img_dec(feat) - target) ** 2).sum((-3, -2, -1)).mean()

    def loss(self, batch: dict[str, torch.Tensor], compiled: bool = False, noise: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        """World-model loss on a ``[B, T]`` batch: ``(loss, metrics, posterior states)``. ``compiled``: the
        posterior steps (``RSSM.observe``), the image encoder and the image loss (decoder + squared error,
        one graph: its elementwise work is the gain) run as compiled graphs.
        ``noise [B, T, S]``: the posterior draws (fresh ones if None)."""
        embed = self.encode(batch, compiled)
        out = self.rssm.observe(embed, batch["action"], batch["is_first"], noise=noise, compiled=compiled)
        feat = self.rssm.feat(out["deter"], out["stoch"])
        losses: dict[str, torch.Tensor] = {}
        rec = torch.zeros((), device=feat.device)
        if self.vector_dim:
            losses["rec_vector"] = ((self.vec_dec(feat) - symlog(batch["vector"])) ** 2).sum(-1).mean()
            rec = rec + losses["rec_vector"]
        if self.image:
            rec_image = runtime.compiled(self, "rec_image", self.rec_image) if compiled else self.rec_image
            losses["rec_image"] = rec_image(feat, batch["image"])
            rec = rec + losses["rec_image"]
        losses["reward"] = twohot_loss(self.reward_head(feat), batch["reward"], self.bins).mean()
        cont_target = (~batch["is_terminal"]).float()
        losses["cont"] = F.binary_cross_entropy_with_logits(self.cont_head(feat).squeeze(-1), cont_target)
        dyn, rep, kl = kl_losses(out["post"], out["prior"], FREE_NATS)
        losses["dyn"], losses["rep"] = dyn.mean(), rep.mean()
        total = (LOSS_SCALES["rec"] * rec + LOSS_SCALES["reward"] * losses["reward"]
                 + LOSS_SCALES["cont"] * losses["cont"] + LOSS_SCALES["dyn"] * losses["dyn"]
                 + LOSS_SCALES["rep"] * losses["rep"])
        metrics = {f"wm/{k}": v.detach() for k, v in losses.items()}
        metrics["wm/kl"] = kl.mean()
        post_logp = out["post"].detach().log_softmax(-1)
        metrics["wm/post_entropy"] = -(post_logp.exp() * post_logp).sum((-2, -1)).mean()
        metrics["wm/loss"] = total.detach()
        states = {"deter": out["deter"].detach(), "stoch": out["stoch"].detach(), "feat": feat.detach()}
        return total, metrics, states

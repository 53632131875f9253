"""The auto-tuned balancing coefficient (``model.moe.aux_loss_coef: auto``).

Control law, per MoE layer, once per optimizer step on the step's global token counts n: the step is
*unbalanced* when an expert is under ``target_min_load`` of the mean load (the seed's half-the-average
rule) or MaxVio = max/mean - 1 exceeds ``target_maxvio``. After an unbalanced step alpha <- min(alpha * up,
max_coef); after ``window`` balanced steps in a row alpha <- max(alpha * down, min_coef). The counts are
global, so every rank computes the same alpha without communicating.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.layer import MoELayer
from moe_dist.run_config import AutoAuxConfig


class AuxController:
    def __init__(self, cfg: AutoAuxConfig, layers: list[MoELayer]) -> None:
        self.cfg, self.layers = cfg, layers
        self.streak = [0] * len(layers)

    def update(self, counts: list[Tensor]) -> list[float]:
        """Apply the law to each layer's buffer ``aux_coef``; returns the new alphas."""
        c = self.cfg
        alphas = []
        for i, (layer, n) in enumerate(zip(self.layers, counts, strict=True)):
            n = n.double()
            mean = float(n.mean())
            alpha = float(layer.aux_coef)
            if mean > 0:
                unbalanced = (
                    float(n.min()) < c.target_min_load * mean or float(n.max()) / mean - 1 > c.target_maxvio
                )
                if unbalanced:
                    alpha, self.streak[i] = min(alpha * c.up, c.max_coef), 0
                else:
                    self.streak[i] += 1
                    if self.streak[i] >= c.window:
                        alpha, self.streak[i] = max(alpha * c.down, c.min_coef), 0
            with torch.no_grad():
                layer.aux_coef.fill_(alpha)
            alphas.append(alpha)
        return alphas

    def state_dict(self) -> dict:
        return {"streak": list(self.streak)}

    def load_state_dict(self, state: dict) -> None:
        self.streak = list(state["streak"])

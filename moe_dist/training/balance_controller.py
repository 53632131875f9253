"""The auto-tuned balancing coefficient (``model.moe.aux_loss_coef: auto``).

Control law, per MoE layer, once per optimizer step, on the step's global token counts n: the controller
keeps an exponential moving average, over ``horizon`` steps, of the relative loads l = n / mean(n). The
layer is *unbalanced* when the smoothed load of some expert is under ``target_min_load`` (the seed's
half-the-average rule) or the smoothed MaxVio = max(l) - 1 exceeds ``target_maxvio``. After an unbalanced
step alpha <- min(alpha * up, max_coef); after ``window`` balanced steps in a row alpha <- max(alpha * down,
min_coef). The counts are global, so every rank computes the same alpha without communicating.

Why smooth: on byte-level text one step's loads swing with the batch's content (a batch of indented code
sends most spaces to one expert) even when the router is balanced over many batches; a per-step signal
reads that as imbalance and drives alpha to its cap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.moe.layer import MoELayer
from moe_dist.training.config import AutoAuxConfig


class AuxController:
    def __init__(self, cfg: AutoAuxConfig, layers: list[MoELayer]) -> None:
        self.cfg, self.layers = cfg, layers
        self.streak = [0] * len(layers)
        self.smoothed: list[list[float] | None] = [None] * len(layers)

    def update(self, counts: list[Tensor]) -> list[float]:
        """Apply the law to each layer's buffer ``aux_coef``; returns the new alphas."""
        c = self.cfg
        alphas = []
        for i, (layer, n) in enumerate(zip(self.layers, counts, strict=True)):
            n = n.double()
            mean = float(n.mean())
            alpha = float(layer.aux_coef)
            if mean > 0:
                load = (n / mean).tolist()
                prev = self.smoothed[i]
                ema = (
                    load
                    if prev is None
                    else [p + (x - p) / c.horizon for p, x in zip(prev, load, strict=True)]
                )
                self.smoothed[i] = ema
                if min(ema) < c.target_min_load or max(ema) - 1 > c.target_maxvio:
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
        return {
            "streak": list(self.streak),
            "smoothed": [None if s is None else list(s) for s in self.smoothed],
        }

    def load_state_dict(self, state: dict) -> None:
        self.streak = list(state["streak"])
        self.smoothed = list(state.get("smoothed", [None] * len(self.layers)))

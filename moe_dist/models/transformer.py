"""A decoder-only transformer LM with MoE FFNs, byte-level unless model.vocab_size says otherwise. It knows
nothing about ranks: the process groups it needs are handed in.

Shape legend: B sequences (batch), S tokens per sequence, D model dim, V vocab (model.vocab_size), A attention
heads, X head dim (D / A).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.models.config import ModelConfig
from moe_dist.moe.layer import MoELayer, MoEOutput
from moe_dist.moe.placement import Placement
from moe_dist.moe.sync import dense_params
from moe_dist.moe.timing import TimingHook

VOCAB = 256


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        y_BASX = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.proj(y_BASX.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        idx: int,
        moe: bool,
        ep_group,
        balance_group,
        timing_hook: TimingHook | None,
        placement: Placement | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        if moe:
            # the block adds the residual stream itself: x + sum g FFN(norm(x)) is the seed's h = u + ...
            moe_cfg = dataclasses.replace(cfg.moe, residual=False)
            self.ffn: nn.Module = MoELayer(
                moe_cfg, ep_group, balance_group, idx, timing_hook, placement=placement
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff_dense)

    def forward(self, x_BSD: Tensor) -> tuple[Tensor, MoEOutput | None]:
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD))
        h = self.norm2(x_BSD)
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h)
            return x_BSD + out.hidden, out
        return x_BSD + self.ffn(h), None


@dataclass
class LMOutput:
    logits_BSV: Tensor
    aux_loss: Tensor
    """Sum over MoE layers of their balancing terms."""
    moe: list[MoEOutput]
    """One per MoE layer, in depth order."""


class MoETransformer(nn.Module):
    """``placements``: one ``Placement`` for every MoE layer, or one per block index (missing: contiguous);
    None = contiguous everywhere. Like the groups, it is handed in: the model knows nothing of ranks."""

    def __init__(
        self,
        cfg: ModelConfig,
        ep_group=None,
        balance_group=None,
        timing_hook: TimingHook | None = None,
        placements: Placement | Mapping[int, Placement] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size or VOCAB, cfg.d_model)  # 0: bytes (the launch fills it in)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)

        def placement(i: int) -> Placement | None:
            return placements.get(i) if isinstance(placements, Mapping) else placements

        self.blocks = nn.ModuleList(
            Block(cfg, i, (i + 1) % cfg.moe_every == 0, ep_group, balance_group, timing_hook, placement(i))
            for i in range(cfg.n_layers)
        )
        self.norm = nn.RMSNorm(cfg.d_model)
        self._init_dense()

    @torch.no_grad()
    def _init_dense(self) -> None:
        for name, p in self.named_parameters():
            if ".experts." in name or ".router." in name or p.dim() < 2:
                continue  # experts and router initialise themselves; norms stay at 1
            nn.init.normal_(p, std=self.cfg.init_std)

    def forward(self, idx_BS: Tensor) -> LMOutput:
        S = idx_BS.shape[1]
        x_BSD = self.embed(idx_BS) + self.pos(torch.arange(S, device=idx_BS.device))
        moe_outs: list[MoEOutput] = []
        for block in self.blocks:
            x_BSD, out = block(x_BSD)
            if out is not None:
                moe_outs.append(out)
        x_BSD = self.norm(x_BSD)
        logits_BSV = x_BSD @ self.embed.weight.t()  # tied embeddings
        aux = sum((o.aux_loss for o in moe_outs), logits_BSV.new_zeros(()))
        return LMOutput(logits_BSV, aux, moe_outs)


def active_params(model: nn.Module, cfg: ModelConfig) -> int:
    """Parameters touched per token (dense, shared experts included, + K of N experts per MoE layer), for
    the MFU estimate."""
    n_moe = sum(isinstance(b.ffn, MoELayer) for b in model.blocks)  # type: ignore[union-attr]
    dense = sum(p.numel() for p in dense_params(model))
    per_expert = (3 if cfg.moe.gated else 2) * cfg.d_model * cfg.moe.d_ff  # gated: W_gate, W_up, W2
    return dense + n_moe * cfg.moe.top_k * per_expert

"""Grouped expert FFNs: stacked weights, one grouped GEMM per projection.

Shape legend: P rows (token, expert pairs) grouped by local expert, D model dim, F ffn dim,
L local experts.  FFN_i(u) = act(u W1_i) W2_i, W1 [L, D, F], W2 [L, F, D].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.comm import contiguous_grad

_ACTS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


def grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    """Whether F.grouped_mm takes these operands (fp64 and misaligned strides are not)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    # why: the kernel needs every row stride to be a multiple of 16 bytes
    return all(n * x.element_size() % 16 == 0 for n in (w.shape[1], w.shape[2]))


def grouped_matmul(x_PD: Tensor, w_LDF: Tensor, counts_L: Tensor) -> Tensor:
    """rows of group e times w[e], for groups of sizes counts_L laid out back to back."""
    if grouped_mm_ok(x_PD, w_LDF):
        offs = torch.cumsum(counts_L, 0).to(torch.int32)
        return contiguous_grad(F.grouped_mm(x_PD, w_LDF.to(x_PD.dtype), offs=offs))
    # plain fallback (fp64 oracles, odd sizes, older torch): one matmul per local expert
    sizes = counts_L.tolist()
    parts = [xe @ w_LDF[e].to(x_PD.dtype) for e, xe in enumerate(torch.split(x_PD, sizes))]
    return torch.cat(parts) if parts else x_PD.new_zeros(0, w_LDF.shape[2])


class GroupedExperts(nn.Module):
    """The ``num_local`` experts of this rank, FFN_i(u) = act(u W1_i) W2_i."""

    def __init__(self, num_local: int, d_model: int, d_ff: int, activation: str = "gelu") -> None:
        super().__init__()
        self.num_local = num_local
        self.w1 = nn.Parameter(torch.empty(num_local, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        self.act = _ACTS[activation]

    @torch.no_grad()
    def init_from_global(self, first_expert: int, num_experts: int) -> None:
        """Initialise as the slice [first, first+L) of an N-expert layer, drawing every expert in order.

        why: all ranks draw the same stream, so an EP=R model equals the EP=1 model for the same seed.
        """
        d_model, d_ff = self.w1.shape[1], self.w1.shape[2]
        b1, b2 = 1 / math.sqrt(d_model), 1 / math.sqrt(d_ff)
        for i in range(num_experts):
            w1 = torch.empty(d_model, d_ff).uniform_(-b1, b1)
            w2 = torch.empty(d_ff, d_model).uniform_(-b2, b2)
            e = i - first_expert
            if 0 <= e < self.num_local:
                self.w1[e].copy_(w1)
                self.w2[e].copy_(w2)

    def forward(self, x_PD: Tensor, counts_L: Tensor) -> Tensor:
        h_PF = self.act(grouped_matmul(x_PD, self.w1, counts_L))
        return grouped_matmul(h_PF, self.w2, counts_L)

"""Grouped expert FFNs (stacked weights, one grouped GEMM per projection) and the dense shared experts.

Shape legend: P rows (token, expert pairs) grouped by local slot, T tokens, D model dim, F ffn dim,
L local slots (each holds one logical expert; see moe_dist/moe/placement.py), H hidden width of the shared FFN
(num_shared_experts * shared_d_ff).

    plain:  FFN_i(u) = act(u W1_i) W2_i,               W1 [L, D, F],  W2 [L, F, D]
    gated:  FFN_i(u) = (act(u W1g_i) * u W1u_i) W2_i,  W1 [L, D, 2F] = [W1g | W1u] (gate first),  W2 [L, F, D]

SwiGLU is act = silu, GeGLU act = gelu; gate and up are fused so that each projection is one grouped GEMM.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.moe.comm import contiguous_grad
from moe_dist.moe.config import GATED_ACTIVATIONS

_ACTS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


def hidden_width(d_ff: int, activation: str) -> int:
    """Columns of W1: F, or 2F for a gated activation (gate and up fused)."""
    return 2 * d_ff if activation in GATED_ACTIVATIONS else d_ff


def apply_activation(h_PX: Tensor, activation: str) -> Tensor:
    """act(h) for a plain activation; act(h[:, :F]) * h[:, F:] for a gated one (h is [P, 2F])."""
    if activation in GATED_ACTIVATIONS:
        gate_PF, up_PF = h_PX.chunk(2, dim=-1)
        return _ACTS[GATED_ACTIVATIONS[activation]](gate_PF) * up_PF
    return _ACTS[activation](h_PX)


def grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    """Whether F.grouped_mm takes these operands (fp64 and misaligned strides are not)."""
    if not hasattr(F, "grouped_mm"):
        return False
    # why: the kernel needs every row stride to be a multiple of 16 bytes (on CUDA too, torch 2.11-2.13)
    if any(n * x.element_size() % 16 for n in (w.shape[1], w.shape[2])):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


class _CachedCast(torch.autograd.Function):
    """Forward: a low-precision copy of ``w`` made earlier. Backward: the gradient cast back to ``w``'s
    dtype, exactly what ``w.to(dtype)`` would give."""

    @staticmethod
    def forward(ctx, w: Tensor, w_low: Tensor) -> Tensor:
        ctx.dtype = w.dtype
        return w_low.view_as(w_low)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.dtype), None


class CastCache:
    """Low-precision copies of parameters, made once per weight update instead of once per call.

    why: under bf16 autocast every forward cast every local expert weight (20 ms per step at E=128 on
    CPU); the optimizer updates weights in place, which bumps their version counter, so the copy is made
    again exactly when the fp32 master weight changed (once per optimizer step).
    """

    def __init__(self) -> None:
        self._copies: dict[int, tuple[tuple[int, int, torch.dtype], Tensor]] = {}
        self.casts = 0  # copies made, for tests and profiling

    def __call__(self, w: Tensor, dtype: torch.dtype) -> Tensor:
        if w.dtype == dtype:
            return w
        # why the data pointer too: ``p.data = other`` (some sharding engines do it) keeps the version counter
        key = (w._version, w.data_ptr(), dtype)
        hit = self._copies.get(id(w))
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, w.detach().to(dtype))
            self._copies[id(w)] = hit
            self.casts += 1
        return _CachedCast.apply(w, hit[1]) if w.requires_grad and torch.is_grad_enabled() else hit[1]


def grouped_matmul(x_PD: Tensor, w_LDF: Tensor, counts_L: Tensor) -> Tensor:
    """rows of group s times w[s], for groups of sizes counts_L laid out back to back."""
    if grouped_mm_ok(x_PD, w_LDF):
        offs = torch.cumsum(counts_L, 0).to(torch.int32)
        return contiguous_grad(F.grouped_mm(x_PD, w_LDF.to(x_PD.dtype), offs=offs))
    # plain fallback (fp64 oracles, odd sizes, older torch): one matmul per local slot
    sizes = counts_L.tolist()
    parts = [xe @ w_LDF[e].to(x_PD.dtype) for e, xe in enumerate(torch.split(x_PD, sizes))]
    return torch.cat(parts) if parts else x_PD.new_zeros(0, w_LDF.shape[2])


def expert_seed(seed: int, layer_idx: int, expert_id: int) -> int:
    """The generator seed of one expert's init: a stable 63-bit hash of (run seed, layer, global id)."""
    digest = hashlib.sha256(f"expert-init:{seed}:{layer_idx}:{expert_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class GroupedExperts(nn.Module):
    """The ``num_slots`` expert slots of this rank, stacked: FFN_s(u) = act(u W1_s) W2_s, or gated (see the
    module doc). Which logical expert a slot holds is the layer's placement's business, not this module's."""

    def __init__(self, num_slots: int, d_model: int, d_ff: int, activation: str = "gelu") -> None:
        super().__init__()
        self.num_slots = num_slots
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_slots, d_model, hidden_width(d_ff, activation)))
        self.w2 = nn.Parameter(torch.empty(num_slots, d_ff, d_model))
        self.cast = CastCache()

    @torch.no_grad()
    def init_experts(self, expert_ids: Sequence[int] | int, seed: int, layer_idx: int) -> None:
        """Initialise slot s from the generator of its logical expert ``expert_ids[s]``, seeded by
        (seed, layer_idx, expert id); an int is the first id of a contiguous run (slot s holds id + s).

        why per expert: a rank draws only its own experts (start-up scales with N/R, not N), an expert's
        weights do not depend on the EP size (an EP=R model equals the EP=1 model for the same seed), and
        every replica of an expert starts equal to its original.
        """
        if isinstance(expert_ids, int):
            expert_ids = range(expert_ids, expert_ids + self.num_slots)
        if len(expert_ids) != self.num_slots:
            raise ValueError(f"{len(expert_ids)} expert ids for {self.num_slots} slots")
        d_model, d_ff = self.w1.shape[1], self.w2.shape[1]
        b1, b2 = 1 / math.sqrt(d_model), 1 / math.sqrt(d_ff)
        for s, expert in enumerate(expert_ids):
            g = torch.Generator().manual_seed(expert_seed(seed, layer_idx, expert))
            self.w1[s].uniform_(-b1, b1, generator=g)
            self.w2[s].uniform_(-b2, b2, generator=g)

    def forward(self, x_PD: Tensor, counts_L: Tensor) -> Tensor:
        w1, w2 = self.cast(self.w1, x_PD.dtype), self.cast(self.w2, x_PD.dtype)
        h_PF = apply_activation(grouped_matmul(x_PD, w1, counts_L), self.activation)
        return grouped_matmul(h_PF, w2, counts_L)


class SharedExperts(nn.Module):
    """Every shared expert as ONE dense FFN of width H = num_shared_experts * shared_d_ff (DeepSeek-V3's
    and Qwen2-MoE's layout: n separate FFNs summed equal one FFN with their hidden units side by side),
    with the routed experts' activation. Optional Qwen2-MoE gate: out = sigmoid(u . w_g) * FFN(u).

    These are dense parameters: replicated on every rank, gradients averaged over the world (they are not
    under ``MoELayer.experts``, so ``model.expert_params`` leaves them out).
    """

    def __init__(self, d_model: int, width: int, activation: str, gate: bool) -> None:
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(d_model, hidden_width(width, activation)))
        self.w2 = nn.Parameter(torch.empty(width, d_model))
        self.gate = nn.Parameter(torch.empty(d_model)) if gate else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.uniform_(self.w1, -1 / math.sqrt(self.w1.shape[0]), 1 / math.sqrt(self.w1.shape[0]))
        nn.init.uniform_(self.w2, -1 / math.sqrt(self.w2.shape[0]), 1 / math.sqrt(self.w2.shape[0]))
        if self.gate is not None:
            nn.init.uniform_(self.gate, -1 / math.sqrt(self.gate.shape[0]), 1 / math.sqrt(self.gate.shape[0]))

    def forward(self, x_TD: Tensor) -> Tensor:
        h_TH = apply_activation(x_TD @ self.w1.to(x_TD.dtype), self.activation)
        y_TD = h_TH @ self.w2.to(x_TD.dtype)
        if self.gate is not None:
            y_TD = torch.sigmoid(x_TD @ self.gate.to(x_TD.dtype)).unsqueeze(-1) * y_TD
        return y_TD

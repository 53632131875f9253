"""The transformers sparse-MoE families we make expert-parallel: one ``HFFamily`` row each, holding all
that differs between them. ``moe_dist.models.hf`` reads the row; it has no per-family branch.

A new family is one row of ``FAMILIES`` (and a case in ``tests/models/test_hf.py`` against transformers'
own block). The ``disk_block``/``expert_weights`` columns name the per-expert keys of a pretrained checkpoint
(``moe_dist.models.hf_load``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from moe_dist.errors import ConfigError

DEEPSEEK_V3_BIAS_RATE = 1e-3
"""gamma of the selection-bias update for DeepSeek-V3 blocks (the paper's value; HF's config has none)."""
DEEPSEEK_V3_SEQ_AUX = 1e-4
"""alpha of DeepSeek-V3 blocks' sequence-wise balance loss (the paper's value; HF's config has none)."""


@dataclass(frozen=True)
class HFFamily:
    """One transformers sparse-MoE block family, as far as it differs from the others."""

    kind: str
    """Our name for its layout (``HFBlockSpec.kind``)."""
    block_class: str
    """The transformers class name of its sparse-MoE block."""
    display: str
    """The family's name in messages."""
    normalize_topk: bool | None = None
    """Renormalise the top-K gates; None: read the gate's ``norm_topk_prob``."""
    score_func: str = "softmax"
    gate_fields: tuple[tuple[str, str, type], ...] = ()
    """(MoEConfig field, attribute of the block's gate, type): routing fields read from the gate."""
    shared_expert: str | None = None
    """Attribute of the block holding the shared expert MLP (gate_proj/up_proj/down_proj); None: none."""
    shared_expert_gate: str | None = None
    """Attribute of the block holding the shared expert's sigmoid gate (a Linear to 1); None: ungated."""
    selection_bias: str | None = None
    """Attribute of the block's gate holding the selection bias (our ``router.expert_bias``); None: none."""
    switch_from_router_aux: bool = True
    """aux_loss_coef = K * config.router_aux_loss_coef (HF's load_balancing_loss_func is K x our Switch
    loss); False: the ``balance`` defaults alone."""
    balance: dict[str, Any] = field(default_factory=dict)
    """MoEConfig balancing defaults of the family (an override replaces any of them)."""
    aux_loss_counts: str = "routed"
    """What the Switch loss's f counts, should it be on (MoEConfig.aux_loss_counts)."""
    must_be_zero: tuple[str, ...] = ()
    """HF config fields we do not implement, accepted only at 0 (Mixtral's router_jitter_noise)."""
    disk_block: str = "mlp"
    """Attribute of the decoder layer holding the block in published checkpoints (Mixtral's
    ``block_sparse_moe``; transformers 5.x keeps it as ``mlp`` in memory, and either is read)."""
    expert_weights: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """Per-expert checkpoint names of the (gate, up, down) projections:
    ``{layer}.{disk_block}.experts.{e}.{name}.weight`` ([F, D], [F, D], [D, F]); Mixtral's w1/w3/w2."""


FAMILIES: tuple[HFFamily, ...] = (
    HFFamily(
        "mixtral",
        "MixtralSparseMoeBlock",
        "Mixtral",
        normalize_topk=True,
        must_be_zero=("router_jitter_noise",),
        disk_block="block_sparse_moe",
        expert_weights=("w1", "w3", "w2"),
    ),
    HFFamily(
        "qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        "Qwen2-MoE",
        shared_expert="shared_expert",
        shared_expert_gate="shared_expert_gate",
    ),
    HFFamily("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3-MoE"),
    HFFamily("olmoe", "OlmoeSparseMoeBlock", "OLMoE"),
    HFFamily(
        "deepseek_v3",
        "DeepseekV3MoE",
        "DeepSeek-V3",
        score_func="sigmoid",
        gate_fields=(
            ("routed_scaling_factor", "routed_scaling_factor", float),
            ("n_group", "num_group", int),
            ("topk_group", "topk_group", int),
        ),
        shared_expert="shared_experts",
        selection_bias="e_score_correction_bias",
        switch_from_router_aux=False,
        balance={
            "aux_loss_coef": 0.0,
            "bias_update_rate": DEEPSEEK_V3_BIAS_RATE,
            "seq_aux_loss_coef": DEEPSEEK_V3_SEQ_AUX,
        },
        # a Switch loss turned on by an override counts as Megatron-Core does (as eq. 18 counts for seq)
        aux_loss_counts="unbiased",
    ),
)

FUSED_EXPERTS = ("gate_up_proj", "down_proj")
"""The fused checkpoint layout (transformers 5.x in memory): ``{block}.experts.gate_up_proj`` [N, 2F, D] and
``{block}.experts.down_proj`` [N, D, F], the same in every family."""

BY_CLASS = {f.block_class: f for f in FAMILIES}
BY_KIND = {f.kind: f for f in FAMILIES}
BLOCK_KINDS = {f.block_class: f.kind for f in FAMILIES}
"""transformers class name -> our name for its layout."""


def family_of(block: nn.Module) -> HFFamily:
    name = type(block).__name__
    if name not in BY_CLASS:
        raise ConfigError(f"{name} is not a supported sparse-MoE block (supported: {', '.join(BY_CLASS)})")
    return BY_CLASS[name]

"""What the run config needs to know of a transformers model, without importing the model code: the MoEConfig
fields a block's own config decides (``STRUCTURAL``), the config itself, and its expert count.

transformers is imported only when a function here needs it.
"""

from __future__ import annotations

from pathlib import Path

from moe_dist.errors import ConfigError

STRUCTURAL = (
    "d_model",
    "d_ff",
    "num_experts",
    "top_k",
    "score_func",
    "normalize_topk",
    "activation",
    "num_shared_experts",
    "shared_d_ff",
    "shared_expert_gate",
    "routed_scaling_factor",
    "residual",
    "noisy_gating",
)
"""MoEConfig fields read from the block itself; an override of one would no longer compute the block."""


def hf_config_from(spec: str | dict, seq_len: int | None = None):
    """A transformers config from a local directory or an inline dict with ``model_type`` (vocab_size 256 if
    the dict has none). Whether its vocabulary holds the data's is checked at launch
    (moe_dist/training/data_check.py)."""
    from transformers import AutoConfig

    if isinstance(spec, dict):
        fields = dict(spec)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ConfigError("model.hf_config needs a model_type (e.g. qwen3_moe, deepseek_v3)")
        fields.setdefault("vocab_size", 256)
        try:
            config = AutoConfig.for_model(model_type, **fields)
        except Exception as e:  # noqa: BLE001 - transformers validates fields with several exception types
            # why one line: huggingface_hub's field validation error spans lines (field, then cause)
            raise ConfigError(f"model.hf_config: {' '.join(str(e).split())}") from None
    else:
        if not (Path(spec) / "config.json").is_file():
            raise ConfigError(f"model.hf_config={spec!r} is not a directory with a config.json")
        config = AutoConfig.from_pretrained(spec)
    max_pos = getattr(config, "max_position_embeddings", None)
    if seq_len is not None and max_pos is not None and max_pos < seq_len:
        raise ConfigError(f"model.hf_config: max_position_embeddings={max_pos} < model.seq_len={seq_len}")
    return config


def hf_num_experts(spec: str | dict) -> int:
    """Routed experts per MoE layer of the config (for the EP divisibility check before any process group)."""
    config = hf_config_from(spec)
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        n = getattr(config, name, None)
        if isinstance(n, int) and n > 0:
            return n
    raise ConfigError(f"model.hf_config ({config.model_type}) names no expert count")

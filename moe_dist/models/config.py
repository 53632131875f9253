"""The run config's model section (``model.*``): our byte LM's shape, or a transformers model's config."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from moe_dist.errors import ConfigError
from moe_dist.models.hf_config import STRUCTURAL
from moe_dist.moe.config import MoEConfig, check_positive, check_type


@dataclass
class ModelConfig:
    d_model: int = 128
    """D: residual stream width."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads (d_model must divide by it)."""
    seq_len: int = 128
    """Context length in tokens (bytes for the byte corpora)."""
    vocab_size: int = 0
    """Rows of the byte LM's embedding (kind=moe_dist); 0 = the data's vocabulary, filled in at launch: 256
    for the byte corpora, the tokenizer's for data.kind=tokens. Set, it must hold every id of the data.
    kind=hf: unused (the HF config's vocab_size is the embedding)."""
    moe_every: int = 1
    """An MoE FFN in every k-th block (k=1: every block); the others get a dense FFN."""
    d_ff_dense: int = 512
    """Hidden width of the dense FFN blocks."""
    init_std: float = 0.02
    """Std of the embedding and attention weight init."""
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(d_model=128))
    """The MoE layers. moe.d_model follows d_model. The block adds the residual stream
    (x + MoE(norm(x))), so the layer is built with its own residual off."""
    kind: str = "moe_dist"
    """"moe_dist" (our byte LM, the fields above) or "hf": a transformers causal LM built from
    ``hf_config`` with its sparse-MoE blocks made expert-parallel (moe_dist/hf.py); then only seq_len and
    ``hf_moe`` of this section are read (needs the ``hf`` extra)."""
    hf_config: str | dict | None = None
    """kind=hf: a local directory holding a transformers config.json, or the config's fields inline (with
    ``model_type``; vocab_size is 256 if absent). Its vocab_size must hold every id of the data (256 for
    bytes, the tokenizer's vocabulary for data.kind=tokens), checked at launch."""
    hf_pretrained: str | None = None
    """kind=hf: a local transformers checkpoint directory (config.json and *.safetensors, one file or shards
    with model.safetensors.index.json) whose weights the model starts from (moe_dist/models/hf_load.py);
    each rank reads the dense tensors and only its own experts. hf_config defaults to it."""
    hf_moe: dict = field(default_factory=dict)
    """kind=hf: MoEConfig fields for the swapped layers beyond the block's own routing (aux_loss_coef,
    z_loss_coef, balance_scope, bias_update_rate, capacity_factor, ...); unset ones come from the HF config
    (see moe_dist.models.hf.hf_block_config)."""

    def __post_init__(self) -> None:
        self._check_hf()
        for name in ("d_model", "n_layers", "n_heads", "seq_len", "moe_every", "d_ff_dense"):
            check_positive("model", self, name)
            check_type("model", name, getattr(self, name), (int,))
        check_positive("model", self, "init_std")
        check_type("model", "vocab_size", self.vocab_size, (int,))
        check_positive("model", self, "vocab_size", allow_zero=True)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )
        if self.moe.d_model != self.d_model:
            raise ConfigError(f"model.moe.d_model={self.moe.d_model} must equal model.d_model={self.d_model}")

    @property
    def hf_source(self) -> str | dict | None:
        """Where ``hf_config`` (and a pretrained model's structure and tokenizer) is read: ``hf_config``
        itself, or the run directory's copy of its files when that directory is gone and the launch resumes a
        checkpoint (``read_config_from``). Not a config key: the run config keeps naming the directory."""
        return self.__dict__.get("_read_from") or self.hf_config

    def read_config_from(self, directory: str) -> None:
        """``hf_source`` becomes ``directory`` (moe_dist/checkpoint/model_files.py decides when)."""
        self.__dict__["_read_from"] = directory

    def _check_hf(self) -> None:
        if self.kind not in ("moe_dist", "hf"):
            raise ConfigError(f"model.kind must be moe_dist or hf, got {self.kind!r}")
        check_type("model", "hf_config", self.hf_config, (str, dict), optional=True)
        check_type("model", "hf_moe", self.hf_moe, (dict,))
        check_type("model", "hf_pretrained", self.hf_pretrained, (str,), optional=True)
        if self.hf_pretrained is not None:
            if self.kind != "hf":
                raise ConfigError("model.hf_pretrained needs model.kind: hf")
            if self.hf_config is None:
                self.hf_config = self.hf_pretrained
            elif self.hf_config != self.hf_pretrained:
                raise ConfigError(
                    "model.hf_pretrained reads its own config.json; leave model.hf_config unset"
                )
        if self.kind != "hf":
            return
        if self.hf_config is None:
            raise ConfigError("model.kind=hf needs model.hf_config (a directory or the config's fields)")
        if isinstance(self.hf_config, dict) and not self.hf_config.get("model_type"):
            raise ConfigError("model.hf_config needs a model_type (e.g. qwen3_moe, deepseek_v3)")
        # a directory without config.json: refused by RunConfig, which knows whether a resume may read the
        # run directory's copy instead (moe_dist/checkpoint/model_files.py, read_stored_model_files)
        names = {f.name for f in dataclasses.fields(MoEConfig)} - set(STRUCTURAL)
        for key in self.hf_moe:
            if key not in names:
                near = difflib.get_close_matches(str(key), sorted(names), n=1)
                hint = f"; did you mean model.hf_moe.{near[0]}?" if near else ""
                why = " (read from the HF config)" if key in STRUCTURAL else ""
                raise ConfigError(f"model.hf_moe.{key} cannot be set{why}{hint}")

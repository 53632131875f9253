"""The data against the model, at launch and before any process group (torch-free): the data kind's own check
(``DATA_KINDS[kind].check``: a bad path, an unprepared or empty dataset), the model's vocabulary against the
data's, and a pretrained model's tokenizer against the one the data was made with. Each refusal is one
ConfigError line. Then ``model.vocab_size: 0`` becomes the data's vocabulary (the byte LM's embedding rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moe_dist.data.kinds import DATA_KINDS, build_corpus
from moe_dist.data.token_files import tokenizer_hash
from moe_dist.errors import ConfigError

if TYPE_CHECKING:
    from moe_dist.training.config import RunConfig


def resolve_vocab(cfg: RunConfig) -> None:
    """``model.vocab_size: 0`` of the byte LM becomes the data's vocabulary, in place (idempotent). Why at
    launch, before the preflight: the checkpoint's stored config and config.yaml then hold the real value,
    and a resume compares like with like."""
    if cfg.model.kind == "moe_dist" and not cfg.model.vocab_size:
        cfg.model.vocab_size = DATA_KINDS[cfg.data.kind].vocab(cfg.data)


def check_data(cfg: RunConfig) -> None:
    """Every refusal the data can cause, before any process group; then ``resolve_vocab``."""
    kind = DATA_KINDS[cfg.data.kind]
    kind.check(cfg.data, cfg.model.seq_len)
    vocab = kind.vocab(cfg.data)
    tokenizer = kind.tokenizer(cfg.data)
    what = f"the tokenizer's vocabulary ({vocab})" if tokenizer else f"the byte corpus's {vocab} values"
    if cfg.model.kind == "hf":
        from moe_dist.models.hf_config import hf_config_from

        rows = hf_config_from(cfg.model.hf_source, cfg.model.seq_len).vocab_size
        if vocab > rows:
            raise ConfigError(
                f"data.kind={cfg.data.kind}: {what} is larger than the model's embedding (its config's "
                f"vocab_size={rows}); use a model made for this tokenizer, or a config with vocab_size >= "
                f"{vocab}"
            )
        if tokenizer and isinstance(cfg.model.hf_source, str):  # the run's copy, when resuming without it
            _check_same_tokenizer(cfg.model.hf_source, tokenizer, cfg.data.path)
    elif cfg.model.vocab_size and cfg.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than {what} of data.kind={cfg.data.kind}; "
            f"leave it 0 (the data's) or set it >= {vocab}"
        )
    resolve_vocab(cfg)


def _check_same_tokenizer(model_dir: str, tokenizer: dict, data_path: str) -> None:
    """A model directory with tokenizer files must hold the tokenizer the data was made with."""
    found = tokenizer_hash(model_dir)
    if found is None or found[0] == tokenizer["hash"]:
        return
    files, made = found[1], tokenizer["files"]
    differ = sorted(n for n in set(files) | set(made) if files.get(n) != made.get(n))
    raise ConfigError(
        f"data.path={data_path!r} was tokenized with {tokenizer['name']!r} (hash {tokenizer['hash'][:12]}), "
        f"but the model directory {model_dir} holds another tokenizer (hash {found[0][:12]}; differing: "
        f"{', '.join(differ)}); prepare the data with --tokenizer {model_dir}"
    )


def corpus_for(cfg: RunConfig, rank: int, world: int) -> Any:
    """The run's corpus (its data kind's row), with ``model.vocab_size`` resolved from it."""
    resolve_vocab(cfg)
    return build_corpus(cfg.data, cfg.model.seq_len, rank, world, cfg.train.seed)

"""Write a fine-tuning example that needs nothing from the network (docs/finetune.md):

    python launch/make_finetune_example.py OUT [--vocab 2048] [--hidden 64] [--layers 2] [--experts 8]

- OUT/model/: a tiny Qwen3-MoE Hugging Face directory (config.json, model-*.safetensors in several shards
  with model.safetensors.index.json) and its tokenizer in the same directory: a byte-level BPE trained with
  ``tokenizers`` on this interpreter's standard library and saved as a ``PreTrainedTokenizerFast``; the
  model's vocab_size is the tokenizer's length. Its weights are random (``from_config``, seeded): a stand-in
  for the pretrained model you have.
- OUT/docs.jsonl: documents (a ``text`` field each): the standard library's .py files cut into pieces of
  at most 8 kB at line ends, one per line.
- OUT/finetune.yaml: the run config of the fine-tune (``model.hf_pretrained: OUT/model``, ``data.kind:
  tokens`` at OUT/data, EP 2), with absolute paths.

OUT must not exist or be empty. Deterministic for a given interpreter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sysconfig
from pathlib import Path

log = logging.getLogger("make_finetune_example")

EOS = "<|endoftext|>"


def stdlib_texts(max_bytes: int) -> list[str]:
    """The standard library's top-level .py files, sorted by name, up to ``max_bytes`` of text."""
    out, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_bytes:
            break
        out.append(text)
        total += len(text)
    return out


def pieces(text: str, size: int = 8000) -> list[str]:
    """``text`` cut at line ends into pieces of at most about ``size`` characters."""
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        if cur and len(cur) + len(line) > size:
            out.append(cur)
            cur = ""
        cur += line
    return [*out, cur] if cur else out


def save_tokenizer(out: Path, texts: list[str], vocab: int) -> int:
    """A byte-level BPE of ``vocab`` entries (EOS included) trained on ``texts``, saved into ``out`` as a
    PreTrainedTokenizerFast; returns its length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.save_pretrained(str(out))
    return len(fast)


def save_model(out: Path, vocab: int, hidden: int, layers: int, experts: int, seed: int = 0) -> None:
    """A seeded Qwen3-MoE of ``vocab`` tokens saved with ``save_pretrained`` (fp32, several shards)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 32),
        num_key_value_heads=max(2, hidden // 32),
        head_dim=16,
        moe_intermediate_size=2 * hidden,
        num_experts=experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(out, max_shard_size=max(nbytes // 3, 20_000))  # several shards, read via the index


def run_config(out: Path, ep: int = 2) -> dict:
    """The fine-tune's run config (the docs' commands override name and train.steps)."""
    return {
        "name": "finetune",
        "out_dir": str(out / "runs"),
        "model": {"kind": "hf", "hf_pretrained": str(out / "model"), "seq_len": 128},
        "data": {"kind": "tokens", "path": str(out / "data")},
        "parallel": {"ep": ep, "backend": "gloo"},
        "train": {"steps": 200, "micro_batch": 4, "eval_every": 50, "ckpt_every": 100, "val_sequences": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 20},
    }


def make_example(
    out: Path,
    vocab: int = 2048,
    hidden: int = 64,
    layers: int = 2,
    experts: int = 8,
    max_bytes: int = 2_000_000,
    ep: int = 2,
) -> dict[str, Path]:
    """Write OUT/model, OUT/docs.jsonl and OUT/finetune.yaml; returns their paths."""
    import yaml

    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; name a new directory")
    texts = stdlib_texts(max_bytes)
    model = out / "model"
    model.mkdir(parents=True)
    n = save_tokenizer(model, texts[: max(1, len(texts) // 4)], vocab)
    save_model(model, n, hidden, layers, experts)
    docs = out / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for t in texts for d in pieces(t)))
    config = out / "finetune.yaml"
    config.write_text(yaml.safe_dump(run_config(out, ep), sort_keys=False))
    log.info("wrote %s (vocab %d), %s (%d files of text), %s", model, n, docs, len(texts), config)
    return {"model": model, "docs": docs, "config": config}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary (EOS included)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--max-bytes", type=int, default=2_000_000, help="text for docs.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_example(args.out, args.vocab, args.hidden, args.layers, args.experts, args.max_bytes)


if __name__ == "__main__":
    main()

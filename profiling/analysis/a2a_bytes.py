"""Cross-rank all-to-all bytes of a trained ``model.kind: hf`` run, with and without group-limited routing:

    python -m profiling.analysis.a2a_bytes runs/<name> [--batches 4]

The run's model is loaded on one process (every expert), fed each rank's validation batches, and each MoE
layer's top-K choice is read off its router, first as trained, then with the group limit switched off
(same weights, same bias). A token of EP rank s sends a row to EP rank d != s for each expert it picked
there: ``pair rows`` is what our dispatcher sends (one row per (token, expert) pair, as DeepSpeed and
Megatron's all-to-all do); ``token rows`` is what a dispatcher that sends each token once per destination
rank would send (DeepSeek-V3's node-limited dispatch). Bytes = rows x D x 4 (fp32), dispatch direction
(the combine all-to-all sends as many back).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from moe_dist.data.kinds import build_corpus
from moe_dist.export_hf import load_run_model
from moe_dist.moe.layer import moe_layers
from moe_dist.moe.placement import Placement
from moe_dist.training.config import load_config


def count(run_dir: Path, batches: int) -> dict:
    cfg = load_config(run_dir / "config.yaml")
    model = load_run_model(run_dir).eval()
    world, ep = json.loads((run_dir / "summary.json").read_text())["world"], cfg.parallel.ep
    layers = moe_layers(model)
    picks: list[torch.Tensor] = []
    for layer in layers:
        layer.router.register_forward_hook(lambda m, i, out: picks.append(out.topk_idx_TK))
    result = {}
    for mode in ("as trained", "no group limit"):
        if mode == "no group limit":
            for layer in layers:
                layer.cfg = layer.router.cfg = dataclasses.replace(layer.cfg, n_group=None, topk_group=None)
        pair = token = total = 0
        for rank in range(world):
            corpus = build_corpus(cfg.data, cfg.model.seq_len, rank, world, cfg.train.seed)
            src = rank % ep
            t = cfg.train
            for b in range(batches):
                x, _ = corpus.batch("val", t.micro_batch, cfg.model.seq_len, t.seed, rank, 0, b)
                picks.clear()
                with torch.no_grad():
                    model(x)
                for layer, idx_TK in zip(layers, picks, strict=True):
                    # the run's placement: the EP rank of the replica this source rank sends each pair to
                    p = Placement.contiguous(layer.cfg.num_experts, ep, cfg.parallel.redundant_experts)
                    route_N = torch.tensor(p.route_table(src))
                    dest_TK = route_N[idx_TK] // p.slots_per_rank
                    remote_TK = dest_TK != src
                    pair += int(remote_TK.sum())
                    onehot_TR = torch.zeros(idx_TK.shape[0], ep, dtype=torch.bool)
                    onehot_TR.scatter_(1, dest_TK, True)
                    onehot_TR[:, src] = False
                    token += int(onehot_TR.sum())
                    total += idx_TK.numel()
        d = layers[0].cfg.d_model
        result[mode] = {
            "pairs": total,
            "pair_rows_cross_rank": pair,
            "token_rows_cross_rank": token,
            "pair_MB": pair * d * 4 / 1e6,
            "token_MB": token * d * 4 / 1e6,
        }
    return result


EXAMPLE = "example: moe-dist a2a-bytes runs/hf_demo --batches 4"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLE)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, default=4, help="validation batches per rank")
    args = parser.parse_args(argv)
    print(json.dumps(count(args.run_dir, args.batches), indent=1))  # noqa: T201 - the command's output


if __name__ == "__main__":
    main()

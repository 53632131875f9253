"""Cross-rank all-to-all bytes of a trained ``model.kind: hf`` run, with and without group-limited routing:

    python -m profiling.analysis.a2a_bytes runs/<name> [--batches 4] [--ep 4 8]

The run's model is loaded on one process (every expert), fed each rank's validation batches, and each MoE
layer's top-K choice is read off its router, first as trained, then with the group limit switched off
(same weights, same bias). Each rank's batch keeps the pairs the run's capacity keeps (``plan_routes``, as
the layer does; all of them when dropless). A kept pair of a token of EP rank s whose expert's slot lies on
EP rank d != s crosses the wire:

    pair rows   one per such (token, expert) pair: what ``moe.dispatch: pairs`` sends (DeepSpeed's and
                Megatron's all-to-all dispatch)
    token rows  one per distinct (token, d): what ``moe.dispatch: dedup`` sends (DeepEP-style), plus a
                8-byte (row, gate) entry per pair row

``wire_rows`` / ``wire_bytes`` are those of the run's configured dispatch (the layers' ``cfg.dispatch``);
bytes = rows x D x 4 (fp32) [+ 16 per pair row for dedup], dispatch direction (the combine all-to-all sends
the rows back). ``--ep R`` projects to EP size R (contiguous placement, no replicas): under weak scaling a
token's source rank is any of the R with equal chance, so each kept pair, and each distinct (token, rank of
its experts), crosses with probability 1 - 1/R (expected rows; the run's own EP is counted exactly).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moe_dist.data.kinds import build_corpus
from moe_dist.export_hf import load_run_model
from moe_dist.moe.dispatcher import plan_routes
from moe_dist.moe.layer import moe_layers
from moe_dist.moe.placement import Placement
from moe_dist.training.config import load_config

PAIR_LIST_BYTES = 8
"""dedup's per-pair entry on the wire: (row, gate) in the fp32 gates' dtype (``pair_list_dtype`` in
moe_dist/moe/dedup.py)."""
VALUE_BYTES = 4
"""fp32 rows."""


@dataclass
class Rows:
    """Cross-rank rows of one or more batches (floats: a projection counts expected rows)."""

    pairs: float = 0.0
    """Top-K (token, expert) pairs, before any capacity drop."""
    kept: float = 0.0
    pair_rows: float = 0.0
    token_rows: float = 0.0

    def add(self, other: Rows) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def wire_rows(self, dispatch: str) -> float:
        return self.token_rows if dispatch == "dedup" else self.pair_rows

    def wire_bytes(self, dispatch: str, d_model: int) -> float:
        """Dispatch-direction bytes of ``dispatch``: its rows, and dedup's pair lists."""
        lists = PAIR_LIST_BYTES * self.pair_rows if dispatch == "dedup" else 0.0
        return self.wire_rows(dispatch) * d_model * VALUE_BYTES + lists


def kept_pairs(
    idx_TK: Tensor, scores_TK: Tensor, route_N: Tensor, num_slots: int, capacity_factor: float | None
) -> tuple[Tensor, Tensor]:
    """(token, global slot) of each pair one source rank's batch keeps, planned as the layer plans it."""
    K = idx_TK.shape[1]
    slot_TK = route_N[idx_TK]
    plan = plan_routes(slot_TK, scores_TK, num_slots, capacity_factor, route_N.numel())
    return plan.order_P // K, slot_TK.reshape(-1)[plan.order_P]


def batch_rows(
    idx_TK: Tensor, scores_TK: Tensor, placement: Placement, src: int, capacity_factor: float | None
) -> Rows:
    """Exact cross-rank rows of EP rank ``src``'s batch under ``placement`` (its route table)."""
    route_N = torch.tensor(placement.route_table(src), dtype=torch.int64)
    L = placement.slots_per_rank
    tok_P, slot_P = kept_pairs(idx_TK, scores_TK, route_N, placement.ep * L, capacity_factor)
    dest_P = slot_P // L
    remote = dest_P != src
    token = torch.unique(tok_P[remote] * placement.ep + dest_P[remote]).numel()
    return Rows(idx_TK.numel(), tok_P.numel(), int(remote.sum()), token)


def projected_rows(
    idx_TK: Tensor, scores_TK: Tensor, num_experts: int, ep: int, capacity_factor: float | None
) -> Rows:
    """Expected cross-rank rows of one batch at EP size ``ep`` (contiguous placement, no replicas), its
    source rank any of the ``ep`` with equal chance."""
    # no replicas: slot = expert, so which pairs a capacity drops does not depend on ep
    tok_P, slot_P = kept_pairs(idx_TK, scores_TK, torch.arange(num_experts), num_experts, capacity_factor)
    dest_P = slot_P // (num_experts // ep)
    distinct = torch.unique(tok_P * ep + dest_P).numel()
    cross = 1.0 - 1.0 / ep
    return Rows(idx_TK.numel(), tok_P.numel(), cross * tok_P.numel(), cross * distinct)


def count(run_dir: Path, batches: int, eps: list[int] | None = None) -> dict:
    cfg = load_config(run_dir / "config.yaml")
    model = load_run_model(run_dir).eval()
    world, ep = json.loads((run_dir / "summary.json").read_text())["world"], cfg.parallel.ep
    layers = moe_layers(model)
    picks: list[tuple[Tensor, Tensor]] = []
    for layer in layers:
        layer.router.register_forward_hook(
            lambda m, i, out: picks.append((out.topk_idx_TK, out.topk_scores_TK))
        )
    lcfg = layers[0].cfg
    dispatch, d, N = lcfg.dispatch, lcfg.d_model, lcfg.num_experts
    targets = [r for r in (eps or []) if r >= 1 and N % r == 0]
    result: dict = {"dispatch": dispatch, "d_model": d, "ep": ep}
    skipped = [r for r in (eps or []) if r not in targets]
    if skipped:
        result["skipped_ep"] = f"{skipped}: not a divisor of the {N} experts"
    for mode in ("as trained", "no group limit"):
        if mode == "no group limit":
            for layer in layers:
                layer.cfg = layer.router.cfg = dataclasses.replace(layer.cfg, n_group=None, topk_group=None)
        here, there = Rows(), {r: Rows() for r in targets}
        for rank in range(world):
            corpus = build_corpus(cfg.data, cfg.model.seq_len, rank, world, cfg.train.seed)
            src = rank % ep
            t = cfg.train
            for b in range(batches):
                x, _ = corpus.batch("val", t.micro_batch, cfg.model.seq_len, t.seed, rank, 0, b)
                picks.clear()
                with torch.no_grad():
                    model(x)
                for layer, (idx_TK, scores_TK) in zip(layers, picks, strict=True):
                    cf = layer.cfg.capacity_factor
                    # the run's placement: the EP rank of the replica this source rank sends each pair to
                    p = Placement.contiguous(N, ep, cfg.parallel.redundant_experts)
                    here.add(batch_rows(idx_TK, scores_TK, p, src, cf))
                    for r in targets:
                        there[r].add(projected_rows(idx_TK, scores_TK, N, r, cf))
        result[mode] = {
            "pairs": int(here.pairs),
            "kept_pairs": int(here.kept),
            "pair_rows_cross_rank": int(here.pair_rows),
            "token_rows_cross_rank": int(here.token_rows),
            "pair_MB": here.pair_rows * d * VALUE_BYTES / 1e6,
            "token_MB": here.token_rows * d * VALUE_BYTES / 1e6,
            "wire_rows": int(here.wire_rows(dispatch)),
            "wire_bytes": int(here.wire_bytes(dispatch, d)),
            "projected": {
                str(r): {
                    "pair_rows_cross_rank": rows.pair_rows,
                    "token_rows_cross_rank": rows.token_rows,
                    "wire_rows": rows.wire_rows(dispatch),
                    "wire_bytes": rows.wire_bytes(dispatch, d),
                }
                for r, rows in there.items()
            },
        }
    return result


EXAMPLE = "example: moe-dist a2a-bytes runs/hf_demo --batches 4"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLE)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, default=4, help="validation batches per rank")
    parser.add_argument("--ep", type=int, nargs="*", default=[], help="EP sizes to project to")
    args = parser.parse_args(argv)
    print(json.dumps(count(args.run_dir, args.batches, args.ep), indent=1))  # noqa: T201 - the command's output


if __name__ == "__main__":
    main()

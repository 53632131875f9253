"""What-if for a slot placement with replicas (moe_dist.moe.placement): its straggler share of the step.

    python -m profiling.analysis.whatif RUN_DIR --ep 8 --placement balanced --redundant 2
    [--rebalance-every 100]
        [--allreduce-gbps 1.0] [--a2a-gbps 1.0] [--expert-params P]

Shape legend: N logical experts, R' target EP ranks, L = N / R' + ``redundant`` slots per rank.

For one MoE layer l, a placement of R' x L slots and every recorded step:

    counts_RN   per-sender counts: the step's ``tokens_per_expert_RN`` from routing.jsonl when logged for R'
                senders, else each global count split evenly over the R' senders; both x R' / R (weak
                scaling, as ``profiling.analysis.whatif``)
    n_r         Placement.rank_loads(counts_RN): rows rank r computes under the replica rule (own replica
                first, the other senders take the replicas in turn), so replicas need not split load evenly
    E_r         a_{l,p} + c_{l,p} * n_r per phase p (the whole-run fit of ``profiling.analysis.whatif``)
    straggler   sum over l, p of (max_r E_r - mean_r E_r)
    sync        per layer, the bytes of one gradient of every replicated expert (4 B x P params each),
                all-reduced once per step over the EP group: bytes / allreduce bandwidth
    migration   per layer, the rows that move from ``Placement.contiguous(N, R', redundant)`` to the placement
                (moe_dist.placement.migrate's source rule):
                weight + AdamW exp_avg + exp_avg_sq = 12 B x P per slot;
                time = max over ranks of max(bytes sent, bytes received) / all-to-all bandwidth, paid once
                every ``rebalance_every`` steps
    step        recorded mean step - recorded sum max E + projected sum max E + sync + migration / every

The straggler share is mean straggler / projected step. ``balanced`` is
``moe_dist.placement.rebalance.balanced_placement`` of the layer's mean per-sender counts over the run,
with the
contiguous layout as the previous placement (in-sample, as whatif's ``greedy``: optimistic for a future run).

Assumptions beyond those of ``profiling.analysis.whatif``:
    - the fitted cost a + c*n holds for L slots per rank (no extra per-slot overhead);
    - the replica gradients are summed by one all-reduce over the EP group per layer and step, of every
      replicated expert's gradient (fp32), at the given algorithm bandwidth (buffer bytes / time);
    - every rebalance moves as many bytes as the first (contiguous -> balanced), fp32 weights and state;
    - the bandwidths are assumed (command-line), not measured from the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from moe_dist.models.config import ModelConfig
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.experts import hidden_width
from moe_dist.moe.placement import Placement
from moe_dist.placement.migrate import transfer_bytes
from moe_dist.placement.rebalance import balanced_placement
from profiling.analysis.report import load_ratio, mean
from profiling.analysis.run_dir import Run, read_jsonl
from profiling.runtime.analysis import PHASES
from profiling.runtime.record import RoutingRecord

log = logging.getLogger("moe_dist.whatif")

ASSUMPTIONS = [
    "balanced: fitted expert cost a + c*n holds for L = N/R' + redundant slots per rank",
    "balanced: replica gradients summed by one fp32 all-reduce per layer and step over the EP group",
    "balanced: every rebalance moves as many bytes as contiguous -> balanced (fp32 weight + AdamW state)",
    "balanced: all-reduce and all-to-all bandwidths are assumed (--allreduce-gbps, --a2a-gbps)",
    "balanced: per-sender counts from routing.jsonl tokens_per_expert_RN when logged, else an even split",
]
BYTES_PER_PARAM = 4
"""fp32 master weights, gradients and AdamW state (the trainer keeps them in fp32)."""
STATE_COPIES = 3
"""What a migrated slot carries per parameter: the weight, exp_avg and exp_avg_sq."""


@dataclass(frozen=True)
class CommModel:
    allreduce_gbps: float = 1.0
    """GB/s of buffer all-reduced over the EP group (algorithm bandwidth: buffer bytes / time)."""
    a2a_gbps: float = 1.0
    """GB/s one rank sends (or receives) in the migration all-to-all."""
    rebalance_every: int = 100
    """Steps between rebalances: the migration's cost is spread over them."""


def expert_params(config: dict) -> int:
    """Parameters of one routed expert of a moe_dist model: D x W1 columns + F x D (config defaults apply)."""
    model = config.get("model", {})
    if model.get("kind", "moe_dist") != "moe_dist":
        raise ValueError("an hf run: pass --expert-params (the parameter count of one routed expert)")
    moe = model.get("moe", {})
    D = int(model.get("d_model", ModelConfig.d_model))
    F = int(moe.get("d_ff", MoEConfig.d_ff))
    return D * hidden_width(F, moe.get("activation", MoEConfig.activation)) + F * D


def replica_sync_ms(placement: Placement, params_per_expert: int, allreduce_gbps: float) -> tuple[int, float]:
    """(bytes, ms) of one step's replica-gradient all-reduce for one layer."""
    replicated = sum(len(placement.replicas(e)) > 1 for e in range(placement.num_experts))
    nbytes = replicated * params_per_expert * BYTES_PER_PARAM
    return nbytes, nbytes / (allreduce_gbps * 1e9) * 1e3


def migration_ms(
    old: Placement, new: Placement, params_per_expert: int, a2a_gbps: float
) -> tuple[int, float]:
    """(bytes over the EP group, ms) of one migration of one layer: the busiest rank's sent or received
    bytes at the all-to-all bandwidth."""
    pair = transfer_bytes(old, new, params_per_expert * BYTES_PER_PARAM * STATE_COPIES)
    R = len(pair)
    busiest = max(max(sum(pair[r]), sum(pair[q][r] for q in range(R))) for r in range(R))
    return sum(map(sum, pair)), busiest / (a2a_gbps * 1e9) * 1e3


def sender_counts(run: Run, ranks: int) -> dict[int, list[list[list[float]]] | None]:
    """step -> per layer [R'][N] counts as logged (``tokens_per_expert_RN``), when logged for R' senders."""
    out: dict[int, list | None] = {}
    for rec in read_jsonl(run.run_dir / "routing.jsonl"):
        rn = RoutingRecord.from_jsonl(rec).tokens_per_expert_RN
        out[int(rec["step"])] = rn if rn is not None and len(rn[0]) == ranks else None
    return out


def step_counts_RN(
    run: Run, logged: dict[int, list | None], step: int, li: int, ranks: int, scale: float
) -> list[list[float]]:
    rn = logged.get(step)
    if rn is not None:
        return [[c * scale for c in row] for row in rn[li]]
    return [[c * scale / ranks for c in run.routing[step][li]] for _ in range(ranks)]


def project_placements(
    run: Run,
    costs: dict,
    base: dict,
    ranks: int,
    placements: list[Placement],
    comm: CommModel,
    params_per_expert: int,
    name: str = "given",
) -> dict:
    """One what-if row for the given placement of each MoE layer (routing order), as ``project_one``'s rows
    plus the replica-sync and migration terms (module doc)."""
    recs = [r for r in run.straggler if r["step"] in run.routing]
    logged = sender_counts(run, ranks)
    scale = ranks / run.world
    layers = []
    straggler = summax = sync = migrate_ms = 0.0
    for li, layer in enumerate(run.layers):
        p = placements[li]
        acc = {"fwd": 0.0, "bwd": 0.0, "ratio": 0.0}
        for r in recs:
            n = p.rank_loads(step_counts_RN(run, logged, r["step"], li, ranks, scale))
            acc["ratio"] += load_ratio(n) / len(recs)
            for ph in PHASES:
                E = [costs[(layer, ph)](x) for x in n]
                acc[ph] += (max(E) - mean(E)) / len(recs)
                summax += max(E) / len(recs)
        sync_bytes, s_ms = replica_sync_ms(p, params_per_expert, comm.allreduce_gbps)
        old = Placement.contiguous(p.num_experts, p.ep, p.redundant)
        mig_bytes, m_ms = migration_ms(old, p, params_per_expert, comm.a2a_gbps)
        straggler += acc["fwd"] + acc["bwd"]
        sync += s_ms
        migrate_ms += m_ms
        layers.append(
            {
                "layer": layer,
                "fwd_straggler_ms": acc["fwd"],
                "bwd_straggler_ms": acc["bwd"],
                "load_ratio": acc["ratio"],
                "slots": [list(row) for row in p.slot_expert_RL],
                "replica_sync_bytes": sync_bytes,
                "replica_sync_ms": s_ms,
                "migration_bytes": mig_bytes,
                "migration_ms": m_ms,
            }
        )
    step = base["step_ms"] - base["sum_max_E_ms"] + summax + sync + migrate_ms / comm.rebalance_every
    return {
        "ep": ranks,
        "placement": name,
        "skipped": None,
        "experts_per_rank": placements[0].slots_per_rank if placements else 0,
        "redundant": placements[0].redundant if placements else 0,
        "token_scale": scale,
        "load_ratio": mean([x["load_ratio"] for x in layers]),
        "straggler_ms": straggler,
        "sum_max_E_ms": summax,
        "replica_sync_ms": sync,
        "migration_ms": migrate_ms,
        "rebalance_every": comm.rebalance_every,
        "amortised_migration_ms": migrate_ms / comm.rebalance_every,
        "step_ms": step,
        "straggler_frac": straggler / step if step > 0 else 0.0,
        "layers": layers,
    }


def balanced_placements(run: Run, ranks: int, redundant: int) -> list[Placement]:
    """Per MoE layer, ``balanced_placement`` of the mean per-sender counts over the run."""
    recs = [r for r in run.straggler if r["step"] in run.routing]
    logged = sender_counts(run, ranks)
    scale = ranks / run.world
    out = []
    for li in range(len(run.layers)):
        per_step = [step_counts_RN(run, logged, r["step"], li, ranks, scale) for r in recs]
        mean_RN = [[mean([c[r][i] for c in per_step]) for i in range(run.num_experts)] for r in range(ranks)]
        prev = Placement.contiguous(run.num_experts, ranks, redundant)  # the run's starting layout
        out.append(balanced_placement(mean_RN, ranks, run.num_experts // ranks + redundant, prev=prev))
    return out


def redundant_message(num_experts: int, ranks: int, redundant: int) -> str | None:
    """None when ``redundant`` slots per rank fit (a rank holds at most N experts), else the skip line."""
    if 0 <= redundant <= num_experts - num_experts // ranks:
        return None
    return f"skipped: {redundant} redundant slots per rank on {ranks} ranks ({num_experts} experts)"

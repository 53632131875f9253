"""GPU-suite parts for the features whose CUDA paths had never run: ``engine: fsdp`` under bf16
(FSDP2's MixedPrecisionPolicy), the activation meter against the CUDA allocator, and ``moe.dispatch``
pairs vs dedup with ``moe.overlap_shared`` off and on at EP 2 on one device.

Each part returns its figures and a ``checks`` dict of named booleans; the runner sets ``passed``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from moe_dist import MoEConfig, MoELayer
from moe_dist.runtime.spawn import run_ranks
from profiling.bench.gpu.common import device_for, rel_err, sync
from profiling.bench.gpu.trainer import numeric_rows, run_config, suite_model
from profiling.bench.hf_load import qwen3_config

FSDP_LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2}
"""Per-step loss, engine fsdp against engine torch. fp32 (a smoke run: bf16 is a CUDA option): the same
math, summed in another order. bf16: MixedPrecisionPolicy casts every parameter to bf16 (norms and the
embedding too) where autocast casts only the matmuls' inputs, so the two differ by bf16 roundings (~4e-3
each) that a few optimizer steps carry along."""


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_here(cfg_path: Path, overrides: list[str], device: torch.device) -> dict:
    """``python -m moe_dist.train CONFIG ...`` as a world of one in this process (its summary.json dict).

    why in-process: a subprocess per run costs a python and torch start-up (seconds each in the smoke run,
    which CI pays); the trainer destroys its process group at the end, so runs follow one another."""
    from moe_dist.train import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # summary.json's peak_allocated: this run's alone
    return main([str(cfg_path), *overrides])


def fsdp_bf16(smoke: bool, out: Path) -> dict:
    """``engine: fsdp`` at world 1 (NCCL; gloo in a smoke run) with train.bf16 against ``engine: torch``
    on the same config: every loss finite and within ``FSDP_LOSS_RTOL``; fsdp's middle checkpoint resumed
    under engine torch passes the resume self-check. summary.json's ``memory_per_rank`` of both runs;
    then the activation meter against the CUDA allocator over one forward (``activation_forward``)."""
    device = device_for(smoke)
    steps = 4 if smoke else 12
    model = suite_model(smoke)
    train = {
        "steps": steps,
        "micro_batch": 4 if smoke else 8,
        "eval_every": steps // 2,
        "val_sequences": 16,
        "ckpt_every": steps // 2,
        "resume_check": "warn",  # why: the record says pass or fail; the part checks it, the run goes on
    }
    work = out / "fsdp_bf16_runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    losses, memory = {}, {}
    for engine in ("torch", "fsdp"):
        cfg = run_config(engine, work / engine, smoke, model, train) | {"engine": engine}
        path = work / f"{engine}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        memory[engine] = train_here(path, [], device).get("memory_per_rank")
        losses[engine] = [r["loss"] for _, r in sorted(numeric_rows(work / engine / engine).items())]
    # fsdp's run with its last checkpoint removed, resumed from the middle one under engine torch
    shutil.copytree(work / "fsdp", work / "resume")
    shutil.rmtree(work / "resume" / "fsdp" / "checkpoints" / f"step_{steps:08d}")
    train_here(work / "fsdp.yaml", [f"out_dir={work / 'resume'}", "engine=torch"], device)
    recs = _records(work / "resume" / "fsdp")
    check = next((r for r in recs if "resume_check" in r), {})
    resumed = [r["loss"] for _, r in sorted(numeric_rows(work / "resume" / "fsdp").items())]
    mode = "fp32" if smoke else "bf16"
    rel = [abs(a - b) / abs(b) for a, b in zip(losses["fsdp"], losses["torch"], strict=True)]
    res: dict = {
        "steps": steps,
        "precision": mode,
        "losses": losses,
        "max_loss_rel_diff": max(rel),
        "loss_rtol": FSDP_LOSS_RTOL[mode],
        "memory_per_rank": memory,
        "resume": {
            k: check.get(k) for k in ("resume_check", "rel_diff", "saved_val_loss", "resumed_val_loss")
        },
        "resumed_losses": resumed,
        "checks": {
            "finite": all(math.isfinite(x) for v in losses.values() for x in v),
            "all_steps": all(len(v) == steps for v in losses.values()),
            "fsdp_close_to_torch": max(rel) <= FSDP_LOSS_RTOL[mode],
            "resume_under_torch": check.get("resume_check") == "pass" and len(resumed) == steps,
        },
    }
    shutil.rmtree(work, ignore_errors=True)  # checkpoints: MBs that the report does not need
    act = activation_forward(smoke, model, train["micro_batch"], device)
    res["activation_forward"] = act
    res["checks"]["meter_within_allocator"] = act["meter_within_allocator"]
    return res


def activation_forward(smoke: bool, model: dict, batch: int, device: torch.device) -> dict:
    """One forward (the loss included) of the run's model at EP 1, under bf16 autocast on CUDA: the
    activation meter's peak (``SavedTensorsPeak``: bytes saved for backward), the growth of
    ``torch.cuda.max_memory_allocated`` over the memory allocated before it (on CUDA), and the planner's
    ``activation_bytes`` estimate for the same micro-batch. The meter counts what autograd keeps; the
    allocator also sees the forward's transient temporaries, so its growth should be at least the meter's
    (``meter_within_allocator``; on the CPU, where there is no allocator reading, the meter within 25% of
    the planner's estimate instead, the planner test's EP 1 bound being 1%)."""
    from moe_dist.models.transformer import MoETransformer
    from moe_dist.training.config import config_from_dict
    from moe_dist.training.memory import activation_bytes, model_counts
    from moe_dist.training.saved_tensors import SavedTensorsPeak

    cfg = config_from_dict(run_config("act", Path("unused"), smoke, model, {}))
    torch.manual_seed(0)
    net = MoETransformer(cfg.model, None, None).to(device)
    S, V = cfg.model.seq_len, net.embed.num_embeddings
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (batch, S), generator=g).to(device)
    y = torch.randint(0, V, (batch, S), generator=g).to(device)
    bf16 = device.type == "cuda" and cfg.train.bf16
    meter = SavedTensorsPeak()
    state: dict = {}

    def fwd() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
            logits = out.logits_BSV
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        state["loss"] = ce + out.aux_loss

    fwd()  # warm-up: first-call allocations (cuBLAS workspaces) are not the forward's
    state.pop("loss").backward()
    net.zero_grad(set_to_none=True)
    sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter.during(net, fwd)
    sync(device)
    growth = torch.cuda.max_memory_allocated(device) - before if before is not None else None
    estimate = activation_bytes(model_counts(cfg), batch * S, 1, 2 if bf16 else 4)
    state.pop("loss").backward()
    within = growth >= meter.peak if growth is not None else abs(meter.peak - estimate) <= 0.25 * estimate
    return {
        "tokens": batch * S,
        "dtype": "bf16" if bf16 else "fp32",
        "meter_peak": meter.peak,
        "allocator_growth": growth,
        "planner_estimate": estimate,
        "meter_over_estimate": meter.peak / estimate,
        "allocator_over_meter": growth / meter.peak if growth is not None and meter.peak else None,
        "meter_within_allocator": bool(within),
    }


VARIANTS = (("pairs", False), ("pairs", True), ("dedup", False), ("dedup", True))
"""(moe.dispatch, moe.overlap_shared) in the order they run; the first runs twice (``repeat``)."""


def _fwd_bwd(layer: MoELayer, x: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = layer(xi)
    (out.hidden.float().square().mean() + out.aux_loss).backward()
    tensors = [out.hidden.detach(), out.aux_loss.detach(), xi.grad] + [p.grad for p in layer.parameters()]
    # why clone: on the CPU .cpu() is the same storage, which a later step may reuse
    return [t.detach().clone().cpu() for t in tensors], int(out.stats.wire_bytes), int(out.stats.wire_rows)


def _step_ms(layer: MoELayer, x: torch.Tensor, device: torch.device) -> float:
    """One forward + backward, the slowest rank's milliseconds (a barrier first: they start together)."""
    dist.barrier()
    sync(device)
    t0 = time.perf_counter()
    out = layer(x.detach().requires_grad_())
    (out.hidden.float().square().mean() + out.aux_loss).backward()
    sync(device)
    t = torch.tensor([(time.perf_counter() - t0) * 1e3], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    layer.zero_grad(set_to_none=True)
    return float(t)


def dispatch_worker(rank: int, world: int, device_name: str, size: dict) -> dict:
    """Every variant on the same weights and this rank's tokens: results (on the CPU), the dispatch wire
    bytes and rows summed over ranks, and step ms taking turns (order flipped every round)."""
    device = torch.device(device_name)
    group = dist.group.WORLD
    D = size["d_model"]
    x = torch.randn(size["tokens"][rank], D, generator=torch.Generator().manual_seed(1000 + rank)).to(device)
    base = {k: v for k, v in size.items() if k not in ("tokens", "warmup", "iters")}
    layers, got = {}, {}
    for v in VARIANTS:
        torch.manual_seed(0)  # why: every variant gets the same weights
        cfg = MoEConfig(**base, dispatch=v[0], overlap_shared=v[1])
        layers[v] = MoELayer(cfg, ep_group=group, balance_group=group).to(device)
        tensors, wb, wr = _fwd_bwd(layers[v], x)
        w = torch.tensor([wb, wr], dtype=torch.float64)
        dist.all_reduce(w)
        got[v] = {"tensors": tensors, "wire_bytes": int(w[0]), "wire_rows": int(w[1])}
    repeat = _fwd_bwd(layers[VARIANTS[0]], x)[0]
    ms: dict = {v: [] for v in VARIANTS}
    for i in range(size["warmup"] + size["iters"]):
        for v in VARIANTS if i % 2 == 0 else reversed(VARIANTS):
            t = _step_ms(layers[v], x, device)
            if i >= size["warmup"]:
                ms[v].append(t)
    return {"got": got, "repeat": repeat, "ms": ms}


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def dispatch_ep2(smoke: bool, out: Path) -> dict:
    """EP 2 on one device (two gloo ranks with device tensors, fp32), one shared expert: dispatch pairs
    and dedup, overlap_shared off and on. Checks: overlap on equals off bit for bit for each dispatcher
    (where the device repeats the same variant bit for bit; else to 1e-6), dedup equals pairs to fp32
    summation order (1e-5), dedup sends no more rows than pairs. Figures: wire bytes and rows per variant
    (summed over ranks), median step ms (slowest rank; gloo stages device tensors through the host)."""
    device = device_for(smoke)
    size = {
        "d_model": 32 if smoke else 1024,
        "d_ff": 32 if smoke else 1024,
        "num_experts": 8 if smoke else 16,
        "top_k": 2 if smoke else 4,
        "num_shared_experts": 1,
        "shared_d_ff": 32 if smoke else 2048,
        "activation": "swiglu",
        "aux_loss_coef": 0.01,
        "tokens": [48, 40] if smoke else [2048, 1792],  # unequal on purpose: uneven all-to-all splits
        "warmup": 1 if smoke else 2,
        "iters": 2 if smoke else 6,
    }
    ranks = run_ranks(dispatch_worker, 2, str(device), size, timeout=150)
    name = {v: f"{v[0]}{'+overlap' if v[1] else ''}" for v in VARIANTS}
    repeatable = all(_equal(r["repeat"], r["got"][VARIANTS[0]]["tensors"]) for r in ranks)

    def max_err(a: tuple, b: tuple) -> float:
        return max(
            rel_err(s, t) if t.norm() > 0 else float((s - t).abs().max())
            for r in ranks
            for s, t in zip(r["got"][a]["tensors"], r["got"][b]["tensors"], strict=True)
        )

    def bit_equal(a: tuple, b: tuple) -> bool:
        return all(_equal(r["got"][a]["tensors"], r["got"][b]["tensors"]) for r in ranks)

    got0 = ranks[0]["got"]
    res: dict = {
        "size": size,
        "variants": {
            name[v]: {
                "wire_bytes": got0[v]["wire_bytes"],
                "wire_rows": got0[v]["wire_rows"],
                "step_ms": statistics.median(ranks[0]["ms"][v]),
            }
            for v in VARIANTS
        },
        "repeat_bit_equal": repeatable,
        "overlap_bit_equal": {d: bit_equal((d, False), (d, True)) for d in ("pairs", "dedup")},
        "overlap_max_rel_err": {d: max_err((d, True), (d, False)) for d in ("pairs", "dedup")},
        "dedup_max_rel_err": max_err(("dedup", False), ("pairs", False)),
    }
    # why the fallback: where the device does not repeat one variant bit for bit (atomics), no two can be
    close = {d: not repeatable and res["overlap_max_rel_err"][d] <= 1e-6 for d in ("pairs", "dedup")}
    res["checks"] = {
        **{f"overlap_{d}": res["overlap_bit_equal"][d] or close[d] for d in ("pairs", "dedup")},
        "dedup_matches_pairs": res["dedup_max_rel_err"] <= 1e-5,
        "dedup_rows_le_pairs": got0[("dedup", False)]["wire_rows"] <= got0[("pairs", False)]["wire_rows"],
    }
    return res


def hf_pretrained(smoke: bool, out: Path) -> dict:
    """``model.hf_pretrained``'s loader straight onto the device (``load_pretrained(device=...)``: the dense
    tensors and the experts' rows copied from the mapped safetensors into device parameters) at EP 1, fp32:
    its logits against the transformers model it was saved from (``save_pretrained``), on the CPU, on the
    same tokens (relative max error <= 1e-4; the CPU's and the GPU's fp32 kernels sum in other orders), then
    one bf16-autocast forward + backward of the loaded model on the device (a finite loss). The model is a
    seeded tiny Qwen3-MoE (transformers is on the GPU machine)."""
    from transformers import AutoModelForCausalLM

    from moe_dist.models.hf import HFCausalLM
    from moe_dist.models.hf_load import load_pretrained, pretrained_skeleton

    device = device_for(smoke)
    work = out / "hf_pretrained_model"
    shutil.rmtree(work, ignore_errors=True)
    experts, layers, hidden = (4, 2, 64) if smoke else (16, 4, 512)
    config = qwen3_config(experts, layers, hidden, hidden // 2)
    torch.manual_seed(0)
    # why this model as the reference: what save_pretrained wrote is what from_pretrained would read back
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ref.save_pretrained(work)
    model = pretrained_skeleton(work)
    stats = load_pretrained(model, work, device=device)
    lm = HFCausalLM(model).eval()
    tokens = torch.randint(0, 256, (2, 32 if smoke else 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = lm(tokens.to(device)).logits_BSV.float().cpu()
        want = ref(input_ids=tokens, use_cache=False).logits
    err = float((got - want).abs().max() / want.abs().max())
    lm.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        o = lm(tokens.to(device))
    loss = F.cross_entropy(
        o.logits_BSV[:, :-1].reshape(-1, 256).float(), tokens[:, 1:].reshape(-1).to(device)
    )
    (loss + o.aux_loss).backward()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "experts": experts,
        "layers": layers,
        "hidden": hidden,
        "load": stats.to_json(),
        "logits_max_rel_err": err,
        "bf16_loss": float(loss),
        "checks": {"logits": err <= 1e-4, "bf16_step_finite": math.isfinite(float(loss))},
    }

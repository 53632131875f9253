"""``model.hf_pretrained`` load cost per rank: time, peak RSS, bytes read against the checkpoint's bytes.

    python -m profiling.bench.hf_load /tmp/q3_64 --make --experts 64 --layers 4 --hidden 512 --ep 2 4
    python -m profiling.bench.hf_load --estimate configs/plan/qwen3_30b_a3b.yaml --ep 8

``--make`` first writes a seeded Qwen3-MoE (vocab 256, fp32, ``from_config`` + ``save_pretrained`` in 100 MB
shards) into DIR unless DIR already holds one. For each EP size, ``ep`` gloo ranks (DP 1) each load their
part with ``load_pretrained`` **one at a time** (a barrier between turns: each rank's time is its own work,
not its share of a CPU its peers use too); each prints its seconds, bytes read, the checkpoint's bytes,
its resident set before the load, the load's own peak (VmHWM reset first) and after, and the process's
peak (``hf_load.json``'s ``peak_rss_bytes``, imports included). The files are in the page cache after
``--make`` (a warm read).

``--estimate CONFIG`` reads nothing: it builds the run config's ``model.hf_config`` on the meta device and
prints, from the bytes-read rule (dense tensors + the rank's 1/ep of the experts), what each rank would read
of a bf16 checkpoint of that shape.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.runtime.spawn import run_ranks

log = logging.getLogger("moe_dist.bench")

MB = 1e6


def qwen3_config(experts: int, layers: int, hidden: int, moe_ffn: int):
    """A Qwen3-MoE config of this size (vocab 256, heads of 64, top-min(8, experts)): the benches' shapes."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
        num_experts=experts,
        num_experts_per_tok=min(8, experts),
        moe_intermediate_size=moe_ffn,
    )


def make_qwen3(out: Path, experts: int, layers: int, hidden: int, moe_ffn: int, seed: int = 0) -> Path:
    """A seeded Qwen3-MoE checkpoint (vocab 256, fp32) in 100 MB shards; kept if ``out`` has one."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").is_file():
        log.info("%s exists: using it", out)
        return out
    config = qwen3_config(experts, layers, hidden, moe_ffn)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out, max_shard_size="100MB")
    return out


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS: resident now, VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is the load's own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _load_worker(rank: int, world: int, path: str) -> dict:
    from moe_dist.models.hf_load import load_pretrained, pretrained_skeleton
    from moe_dist.moe.parallel import ParallelLayout

    layout = ParallelLayout.build(world)
    pretrained_skeleton(path)  # why: the model code's imports before the RSS baseline, not in the load's peak
    row: dict = {}
    for turn in range(world):
        if turn == rank:  # why one at a time: the CPU time of one rank alone, without its peers' contention
            _reset_peak()
            before = _status_bytes("VmRSS")
            model = pretrained_skeleton(path)
            stats = load_pretrained(model, path, layout)
            row = {
                **stats.to_json(),
                "rss_before_bytes": before,
                "load_peak_rss_bytes": _status_bytes("VmHWM"),
                "rss_after_bytes": _status_bytes("VmRSS"),  # the loaded model still held
            }
            del model
        dist.barrier()
    return row


def estimate(config_path: str, ep: int, bytes_per_param: int = 2) -> dict:
    """Dense and expert bytes of the run config's ``hf_config`` (meta device, nothing read), and a rank's
    share at EP ``ep``: dense + experts / ep."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_dist.training.config import load_config

    spec = dict(load_config(config_path).model.hf_config)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    dense = experts = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            experts += p.numel() * bytes_per_param
        else:
            dense += p.numel() * bytes_per_param
    return {"dense": dense, "experts": experts, "total": dense + experts, "per_rank": dense + experts // ep}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?", help="a checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    p.add_argument("--make", action="store_true", help="write a seeded Qwen3-MoE into DIR first")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-ffn", type=int, default=256)
    p.add_argument("--estimate", metavar="CONFIG", help="a run config whose model.hf_config to size (bf16)")
    args = p.parse_args()
    if args.estimate:
        for ep in args.ep:
            e = estimate(args.estimate, ep)
            log.info(
                "%s at ep=%d (bf16): dense %.2f GB + experts %.2f GB = %.2f GB; "
                "each rank reads %.2f GB (%.1f%%)",
                args.estimate,
                ep,
                e["dense"] / 1e9,
                e["experts"] / 1e9,
                e["total"] / 1e9,
                e["per_rank"] / 1e9,
                100 * e["per_rank"] / e["total"],
            )
        return
    if args.dir is None:
        p.error("DIR is needed unless --estimate")
    path = Path(args.dir)
    if args.make:
        make_qwen3(path, args.experts, args.layers, args.hidden, args.moe_ffn)
    for ep in args.ep:
        for r in run_ranks(_load_worker, ep, str(path), timeout=1800):
            log.info(
                "ep=%d rank %d: read %.1f of %.1f MB in %.2f s; RSS %.0f MB before, peak %.0f MB during, "
                "%.0f MB after the load (process peak %.0f MB)",
                ep,
                r["rank"],
                r["bytes_read"] / MB,
                r["checkpoint_bytes"] / MB,
                r["seconds"],
                r["rss_before_bytes"] / MB,
                r["load_peak_rss_bytes"] / MB,
                r["rss_after_bytes"] / MB,
                r["peak_rss_bytes"] / MB,
            )


if __name__ == "__main__":
    main()

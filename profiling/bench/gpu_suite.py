"""The GPU suite (issue 26): every CUDA check and benchmark in one command, sized for a short GPU loan.

    python -m profiling.bench.gpu_suite --out bench/gpu            # on a GPU: all parts, <= 6 min on an H100
    python -m profiling.bench.gpu_suite --out /tmp/s --smoke       # same code paths, CPU, tiny sizes
    python -m profiling.bench.gpu_suite --out bench/gpu --parts ep2,straggler   # rerun only some parts

Parts, in order (each in its own subprocess with its own timeout; a part that fails or times out records
its error in its JSON and the next one runs):
  matmul_peak     measured bf16 GEMM TFLOP/s (the MFU denominator; later parts read it)
  layer_oracle    the layer against the fp64 oracle at EP 1: fp32, and bf16 autocast
  ep2             EP 2 on one device: two gloo ranks with device tensors, against the oracle
  trainer_resume  30 bf16 steps at world 1 (NCCL), then a resume from step 15 compared bit for bit
  fsdp_bf16       engine fsdp (MixedPrecisionPolicy) vs torch, bf16, world 1; fsdp resumed under torch;
                  the activation meter vs max_memory_allocated over one forward
  dispatch_ep2    EP 2 on one device: dispatch pairs/dedup x overlap_shared off/on, bit-equal, bytes, ms
  hf_pretrained   model.hf_pretrained loaded onto the device: logits vs from_pretrained, a bf16 step
  straggler       CUDA-event straggler timers, injected delay in one rank: wait slope in [0.9, 1.1]
  host_syncs      host syncs in one MoE layer's forward and backward (sync debug mode; profiler ops)
  layer_bench     bf16 fwd+bwd at EP 1, D 2048, F 1024/4096, E 8/32/128, top-2/8, 16k tokens, vs dense
  trainer_bench   a ~0.5B MoE (SwiGLU experts), bf16: tokens/s, MFU, peak memory

Each part writes OUT/PART.json: status ("ok", "error", "timeout"), passed (its checks all held; null for
a part that only measures), seconds, the device, torch and CUDA versions, and its figures. A summary
table is logged at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger("profiling.bench.gpu_suite")

PARTS: dict[str, tuple[str, float]] = {
    "matmul_peak": ("profiling.bench.gpu.layer_bench:matmul_peak", 60),
    "layer_oracle": ("profiling.bench.gpu.checks:layer_oracle", 90),
    "ep2": ("profiling.bench.gpu.checks:ep2", 120),
    "trainer_resume": ("profiling.bench.gpu.trainer:trainer_resume", 150),
    "fsdp_bf16": ("profiling.bench.gpu.features:fsdp_bf16", 120),
    "dispatch_ep2": ("profiling.bench.gpu.features:dispatch_ep2", 90),
    "hf_pretrained": ("profiling.bench.gpu.features:hf_pretrained", 60),
    "straggler": ("profiling.bench.gpu.checks:straggler", 120),
    "host_syncs": ("profiling.bench.gpu.checks:host_syncs", 60),
    "layer_bench": ("profiling.bench.gpu.layer_bench:layer_bench", 150),
    "trainer_bench": ("profiling.bench.gpu.trainer:trainer_bench", 150),
}
"""name -> ("module:function", timeout in seconds on a GPU). The timeouts sum past 6 minutes on purpose:
they bound a hung part, while the expected times (about a third of each) keep the whole suite under 6."""
SMOKE_TIMEOUT_S = 60.0


def write_json(path: Path, rec: dict) -> None:
    """Atomically: a killed part leaves no half-written JSON."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run_part(name: str, out: Path, smoke: bool) -> None:
    """Run one part in this process and write its JSON (status "error" with the traceback on failure)."""
    from profiling.bench.gpu.common import env_info

    target, _ = PARTS[name]
    module, func = target.split(":")
    t0 = time.monotonic()
    rec: dict = {"part": name, "smoke": smoke}
    try:
        rec.update(env_info())
        figures = getattr(importlib.import_module(module), func)(smoke, out)
        checks = _flat(figures.get("checks", {}))
        rec.update(figures, status="ok", passed=all(checks) if checks else None)  # None: a measurement only
    except Exception as e:  # noqa: BLE001 - a part's failure is its result; the suite goes on
        rec.update(
            status="error", passed=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()
        )
    rec["seconds"] = time.monotonic() - t0
    write_json(out / f"{name}.json", rec)


def _flat(checks: dict) -> list[bool]:
    return [bool(v) for v in checks.values()]


def _part_child(name: str, out: Path, smoke: bool) -> None:
    os.setsid()  # why a session of its own: the part's ranks and trainer processes die with it on timeout
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    run_part(name, out, smoke)


def launch_part(name: str, out: Path, smoke: bool) -> dict:
    """The part in a child process under its timeout; its JSON, or one that records the timeout or crash.

    why fork: the child starts with torch already imported (seconds per part on a loaded machine); the
    parent never touches CUDA, so a forked child may initialize it.
    """
    import multiprocessing as mp

    timeout = SMOKE_TIMEOUT_S if smoke else PARTS[name][1]
    path = out / f"{name}.json"
    path.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = mp.get_context("fork").Process(target=_part_child, args=(name, out, smoke), daemon=False)
    proc.start()
    proc.join(timeout)
    status = None
    if proc.is_alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the part and every process it started
        proc.kill()  # a child killed before its setsid has no group of its own yet
        proc.join(10)
        status = f"timeout after {timeout:.0f} s"
    elif not path.exists():
        status = f"crashed (exit code {proc.exitcode})"
    if status is not None:
        write_json(
            path,
            {
                "part": name,
                "smoke": smoke,
                "status": "timeout" if "timeout" in status else "error",
                "passed": False,
                "error": status,
                "seconds": time.monotonic() - t0,
            },
        )
    return json.loads(path.read_text())


def headline(rec: dict) -> str:
    """The part's main figure for the summary table."""
    name = rec["part"]
    if rec["status"] != "ok":
        return rec.get("error", "")[:90]
    if name == "matmul_peak":
        return f"{rec['tflops']:.1f} TFLOP/s"
    if name in ("layer_oracle", "ep2"):
        return "max rel err " + ", ".join(
            f"{m}={max(e.values()):.1e}"
            for m, e in (rec["errors"].items() if name == "layer_oracle" else [("fp32", rec["errors"])])
        )
    if name == "trainer_resume":
        return (
            f"bit-exact={rec['checks']['resume_bit_exact']} deterministic={rec.get('deterministic', 'n/a')}"
        )
    if name == "fsdp_bf16":
        a, mib = rec["activation_forward"], 2**20
        grow = "n/a" if a["allocator_growth"] is None else f"{a['allocator_growth'] / mib:.1f}"
        return (
            f"loss vs torch {rec['max_loss_rel_diff']:.1e}, resume {rec['resume']['resume_check']}; "
            f"fwd MiB meter {a['meter_peak'] / mib:.1f} alloc {grow} plan {a['planner_estimate'] / mib:.1f}"
        )
    if name == "dispatch_ep2":
        v = rec["variants"]
        return (
            f"dedup/pairs bytes {v['dedup']['wire_bytes'] / max(v['pairs']['wire_bytes'], 1):.2f}; ms "
            + " ".join(f"{k}={r['step_ms']:.1f}" for k, r in v.items())
        )
    if name == "hf_pretrained":
        return f"logits rel err {rec['logits_max_rel_err']:.1e}, load {rec['load']['seconds']:.2f} s"
    if name == "straggler":
        return f"slope {rec['slope']:.3f} (waits {[round(w, 1) for w in rec['wait_ms']]} ms)"
    if name == "host_syncs":
        return (
            f"fwd {rec['sync_warnings_fwd']} warn / {rec['sync_ops_fwd']} ops, "
            f"bwd {rec['sync_warnings_bwd']} warn / {rec['sync_ops_bwd']} ops"
        )
    if name == "layer_bench":
        ok = [r for r in rec["rows"] if "error" not in r]
        best = min((r["ratio_to_dense"] for r in ok), default=float("nan"))
        worst = max((r["ratio_to_dense"] for r in ok), default=float("nan"))
        return f"{len(ok)}/{len(rec['rows'])} sizes; ratio to dense {best:.2f}-{worst:.2f}"
    if name == "trainer_bench":
        mem = rec["peak_memory_gb"]
        return f"{rec['tokens_per_s']:.0f} tok/s, MFU {rec['mfu']:.1%}, peak mem {mem and round(mem, 1)} GB"
    return ""


def summary_line(rec: dict) -> str:
    try:
        figures = headline(rec)
    except (KeyError, TypeError, ValueError) as e:  # the JSON is written; a summary slip must not hide it
        figures = f"(no summary: {type(e).__name__} {e})"
    return f"{rec['part']:<15} {rec['status']:<8} {str(rec['passed']):<6} {rec['seconds']:>6.1f}  {figures}"


def layer_table(rec: dict) -> list[str]:
    """The layer benchmark's rows: ms, TFLOP/s and the ratio to dense of each size."""
    lines = ["", "layer_bench (bf16 fwd+bwd, EP 1):", "   F    E  K   moe ms  dense ms  x dense  moe TFLOP/s"]
    for r in rec.get("rows", []):
        size = f"{r['d_ff']:>4} {r['experts']:>4} {r['top_k']:>2}"
        if "error" in r:
            lines.append(f"{size}  {r['error'][:80]}")
        else:
            lines.append(
                f"{size} {r['moe_ms']:>8.2f} {r['dense_ms']:>9.2f} {r['ratio_to_dense']:>8.2f} "
                f"{r['moe_tflops']:>12.1f}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="moe-dist gpu-suite",
        description=__doc__.split("\n\n")[0],
        epilog="example: moe-dist gpu-suite --out bench/gpu   (or: python -m profiling.bench.gpu_suite ...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, required=True, help="directory for one JSON per part")
    ap.add_argument("--smoke", action="store_true", help="the same code paths on the CPU, tiny sizes (CI)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of: {','.join(PARTS)}")
    ap.add_argument("--run-part", help=argparse.SUPPRESS)  # internal: run one part in this process
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.smoke else "8")  # before torch is imported
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run_part:
        run_part(args.run_part, args.out, args.smoke)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    import torch  # noqa: F401 - imported once here, so that every forked part starts with it

    t0 = time.monotonic()
    recs = []
    for name in parts:
        log.info("part %s ...", name)
        recs.append(launch_part(name, args.out, args.smoke))
        log.info("part %s: %s in %.1f s", name, recs[-1]["status"], recs[-1]["seconds"])
    lines = [f"{'part':<15} {'status':<8} {'passed':<6} {'s':>6}  figures"]
    lines += [summary_line(r) for r in recs]
    for r in recs:
        if r["part"] == "layer_bench" and r["status"] == "ok":
            lines += layer_table(r)
    device = next((r.get("device") for r in recs if r.get("device")), "?")
    log.info(
        "GPU suite on %s, %.0f s in all, JSON in %s\n%s",
        device,
        time.monotonic() - t0,
        args.out,
        "\n".join(lines),
    )
    return 0 if all(r["status"] == "ok" and r["passed"] is not False for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The memory planner: bytes per rank of a run config at a layout, before any launch.

    python -m moe_dist.plan CONFIG --world W --ep E --engine torch|fsdp|deepspeed [--zero N]
        [--dtype fp32|bf16] [key=value ...]

CONFIG is a run config (YAML); ``model.kind: hf`` with ``model.hf_config`` plans a transformers model from its
config.json alone (no weights). The logic is moe_dist/training/memory.py; this is its command line.
"""

from __future__ import annotations

import argparse
import json
import sys

from moe_dist.errors import ConfigError
from moe_dist.training.config import load_config
from moe_dist.training.data_check import resolve_vocab
from moe_dist.training.memory import DTYPES, ENGINES, format_plan, plan

EXAMPLE = """example: moe-dist plan configs/cpu_demo.yaml --world 4 --ep 2 --engine fsdp --dtype fp32
  moe-dist plan cfg.yaml --world 8 --ep 8 --engine deepspeed --zero 2 train.micro_batch=2 --json
  (python -m moe_dist.plan takes the same arguments)"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_dist.plan",
        description=__doc__.split("\n")[0],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch=2")
    parser.add_argument("--world", type=int, required=True, help="ranks")
    parser.add_argument("--ep", type=int, default=None, help="EP size (default: the config's parallel.ep)")
    parser.add_argument("--engine", choices=ENGINES, default="torch")
    parser.add_argument("--zero", type=int, default=None, help="ZeRO stage (deepspeed; default: config's)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="fp32 (CPU runs) or bf16 (CUDA with train.bf16: bf16 activations, DeepSpeed's bf16 params); "
        "default: bf16 if the config's train.bf16 is on",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        resolve_vocab(cfg)  # data.kind tokens: the byte LM's embedding is the tokenizer's vocabulary
        zero = cfg.deepspeed.zero_stage if args.engine == "deepspeed" else 0
        zero = args.zero if args.zero is not None else zero
        result = plan(cfg, args.world, args.ep or cfg.parallel.ep, args.engine, zero, args.dtype)
    except ConfigError as e:
        print(f"ConfigError: {e}", file=sys.stderr)  # noqa: T201 - one line, no traceback
        return 2
    print(json.dumps(result.to_json(), indent=1) if args.json else format_plan(result))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenize text for ``data.kind: tokens`` (moe_dist/data/prepare.py does the work):

python -m moe_dist.prepare_data --tokenizer TOK_DIR --out DATA_DIR INPUTS...
"""

from __future__ import annotations

import argparse
import logging
import sys

from moe_dist.data.files import DataError

EXAMPLE = """example: moe-dist prepare-data --tokenizer TOK_DIR --out DATA_DIR corpus.jsonl notes.txt

Inputs: .txt files (one document each) and .jsonl files (one JSON object a line, the text in --field).
A second run with the same inputs does nothing; an interrupted one goes on where it stopped."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moe-dist prepare-data",
        description="Tokenize .txt and .jsonl files into memory-mapped token files and a manifest.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUTS", help=".txt and .jsonl files")
    parser.add_argument("--tokenizer", required=True, help="a local tokenizer directory (AutoTokenizer)")
    parser.add_argument("--out", required=True, help="the output directory (data.path of the run config)")
    parser.add_argument("--field", default="text", help="the .jsonl field holding the text (default: text)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of documents for validation (default 0.01)"
    )
    parser.add_argument("--processes", type=int, default=1, help="tokenizer worker processes (default 1)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a DATA_DIR prepared from other inputs"
    )
    parser.add_argument("--keep-parts", action="store_true", help="keep the per-piece files (DATA_DIR/parts)")
    parser.add_argument("--chunk-mb", type=float, default=8.0, help="size of a .jsonl piece (default 8 MB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from moe_dist.data.prepare import prepare

    try:
        prepare(
            args.tokenizer,
            args.out,
            args.inputs,
            field=args.field,
            val_fraction=args.val_fraction,
            processes=args.processes,
            overwrite=args.overwrite,
            keep_parts=args.keep_parts,
            chunk_bytes=int(args.chunk_mb * (1 << 20)),
        )
    except DataError as e:
        print(f"DataError: {e}", file=sys.stderr)  # noqa: T201 - one line, no traceback
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared test code: oracle (the fp64 reference), workers (rank bodies), asserts (comparisons), launch
(ranks in-process, the trainer by subprocess), shared_runs (runs several files reuse)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (the working directory of every launched command)."""

"""Comparisons against a reference, each with its tolerance in one place."""

from __future__ import annotations

import torch

from tests.helpers.oracle import Case

HF_TOL = 1e-6
"""transformers computes the router softmax/sigmoid in fp32 even for an fp64 model: ~1e-7 relative."""


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """fp64 against the fp64 oracle: equal up to summation order."""
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")


def close_in_dtype(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-12) -> None:
    """Relative closeness in ``a``'s dtype (Megatron returns fp32 where it computes in fp32; ``rtol`` says
    what rounding the comparison allows)."""
    torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=0.0, msg=lambda m: f"{what}: {m}")


def close_to_largest(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Max error relative to the reference's largest entry below ``HF_TOL`` (transformers' blocks)."""
    err = float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    assert err < HF_TOL, f"{what}: max error {err:.2e} relative to the largest entry"


def assert_layer_matches_oracle(case: Case, per_rank: list[dict], ref: dict) -> None:
    """Each rank's output, input grad and its contiguous slice of expert W1/W2 grads, the global f, P,
    counts, drops, aux loss and terms (or the rank's local aux); the router grad summed over ranks (what
    the data-parallel mean turns into the single-process gradient). ``per_rank``: ``layer_results``."""
    L = case.cfg["num_experts"] // len(per_rank)
    for r, got in enumerate(per_rank):
        close(got["hidden"], ref["hidden"][r], f"rank {r} output")
        close(got["grad_x"], ref["grad_x"][r], f"rank {r} input grad")
        close(got["grad_w1"], ref["grad_w1"][r * L : (r + 1) * L], f"rank {r} expert W1 grad")
        close(got["grad_w2"], ref["grad_w2"][r * L : (r + 1) * L], f"rank {r} expert W2 grad")
        close(got["f"], ref["f"], f"rank {r} global f")
        close(got["P"], ref["P"], f"rank {r} global P")
        assert torch.equal(got["counts"], ref["counts"]), f"rank {r} global counts"
        assert got["dropped"] == ref["dropped"], f"rank {r} dropped"
        if ref["local_aux"] is None:
            close(got["aux"], ref["aux"], f"rank {r} aux loss (global value)")
            for k, v in ref["terms"].items():
                close(got["terms"][k], v, f"rank {r} term {k}")
        else:
            close(got["aux"], ref["local_aux"][r], f"rank {r} aux loss (local value)")
    close(sum(g["grad_router"] for g in per_rank), ref["grad_router"], "router grad summed over ranks")


def assert_fp32_paths_match(gmm: dict, loop: dict, ref: dict) -> None:
    """Two fp32 runs of one case (``workers.fp32_run``: F.grouped_mm, then the per-expert matmul fallback)
    agree to 1e-6 and each tensor matches the fp64 oracle to fp32 accuracy (norm-relative 1e-4)."""
    for key in gmm:
        want = ref[key][0] if key in ("hidden", "grad_x") else ref[key]
        assert float((gmm[key] - loop[key]).norm() / loop[key].norm()) < 1e-6, key
        assert float((gmm[key].double() - want).norm() / want.norm()) < 1e-4, key

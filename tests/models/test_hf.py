"""transformers' own MoE blocks and models are the reference: our expert-parallel versions must compute what
they compute, forward and backward, on 1, 2 and 4 gloo ranks; the trainer trains a transformers model
(model.kind=hf), resumes it bit-exactly, and exports it back to a from_pretrained directory.

Tolerance: transformers computes the router softmax/sigmoid in fp32 even for an fp64 model, so the fp64
comparisons hold to ~1e-7 (relative to the largest entry), and are checked to 1e-6.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from moe_dist.models.hf import from_hf_block, hf_block_config  # noqa: E402
from tests.helpers.asserts import close_to_largest as close  # noqa: E402
from tests.helpers.launch import deepspeed_cmd, launch, run_ranks, torchrun_cmd  # noqa: E402
from tests.models.hf_workers import (  # noqa: E402
    BLOCKS,
    HF_TINY,
    block_case_worker,
    block_inputs,
    make_block,
    tiny_config,
    world4_worker,
)
from tests.training.train_workers import tiny  # noqa: E402

TOKENS = [24, 17, 9, 30]  # unequal tokens per rank


def reference(kind: str, seed: int, tokens: list[int]) -> dict:
    """transformers' block forward + backward on the concatenation of every rank's tokens."""
    block = make_block(kind, seed)
    xs, cots = block_inputs(tokens, seed)
    x = torch.cat(xs, dim=1).requires_grad_()
    h = block(x)
    h = h[0] if isinstance(h, tuple) else h
    (h * torch.cat(cots, dim=1)).sum().backward()
    ref = {"hidden": h.detach(), "grad_x": x.grad, "block": block}
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if shared is not None:
        ref["grad_ws1"] = torch.cat([shared.gate_proj.weight.grad.t(), shared.up_proj.weight.grad.t()], dim=1)
        ref["grad_ws2"] = shared.down_proj.weight.grad.t()
        gate = getattr(block, "shared_expert_gate", None)
        ref["grad_wg"] = gate.weight.grad[0] if gate is not None else None
    return ref


LM_BATCHES = [
    (torch.randint(0, 256, (2, 12), generator=g), torch.randint(0, 256, (2, 12), generator=g))
    for g in [torch.Generator().manual_seed(0)]
    for _ in range(4)
]
LM_SEED = 7


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    """One spawn of 4 ranks for both world-4 tests (each rank process pays transformers' import once)."""
    return run_ranks(world4_worker, 4, list(BLOCKS), TOKENS, LM_BATCHES, LM_SEED, timeout=400)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_blocks_match_transformers(world: int, request) -> None:
    kinds = list(BLOCKS)
    tokens = TOKENS[:world]
    flat = None
    if world == 1:
        results = [block_case_worker(0, 1, kinds, tokens)]
        flat = block_case_worker(0, 1, kinds, tokens, flat=True)  # [T, D] input
    elif world == 2:
        results = run_ranks(block_case_worker, world, kinds, tokens, timeout=300)
    else:
        results = [r["blocks"] for r in request.getfixturevalue("world4")]
    n_local = 8 // world
    for i, kind in enumerate(kinds):
        ref = reference(kind, i, tokens)
        block = ref["block"]
        bounds = [sum(tokens[:r]) for r in range(world + 1)]
        for r, res in enumerate(results):
            rows = slice(bounds[r], bounds[r + 1])
            close(res[kind]["hidden"], ref["hidden"][:, rows], f"{kind} EP={world} rank {r} output")
            close(res[kind]["grad_x"], ref["grad_x"][:, rows], f"{kind} EP={world} rank {r} input grad")
            lo, hi = r * n_local, (r + 1) * n_local
            close(
                res[kind]["grad_w1"],
                block.experts.gate_up_proj.grad[lo:hi].transpose(1, 2),
                f"{kind} EP={world} rank {r} gate_up_proj grad",
            )
            close(
                res[kind]["grad_w2"],
                block.experts.down_proj.grad[lo:hi].transpose(1, 2),
                f"{kind} EP={world} rank {r} down_proj grad",
            )
            # gathered back to the block's layout: exactly the block's weights, on every rank
            sd = block.state_dict()
            assert set(res[kind]["state"]) == set(sd)
            for key, value in res[kind]["state"].items():
                assert torch.equal(value, sd[key]), f"{kind} to_hf_state_dict {key}"
        # replicated params: each rank's grad is its tokens' part; their sum is the whole batch's grad
        close(sum(res[kind]["grad_router"] for res in results), block.gate.weight.grad, f"{kind} router grad")
        for name in ("grad_ws1", "grad_ws2", "grad_wg"):
            if ref.get(name) is not None:
                close(sum(res[kind][name] for res in results), ref[name], f"{kind} EP={world} {name}")
        if flat is not None:
            close(flat[kind]["hidden"], ref["hidden"], f"{kind} [T, D] output")
            close(flat[kind]["grad_x"], ref["grad_x"], f"{kind} [T, D] input grad")


def test_switch_loss_equals_mixtral_loss_at_k_times_c() -> None:
    """Our Switch loss at alpha = K*c equals c * transformers' load_balancing_loss_func (one layer)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    c = 0.02
    block = make_block("mixtral", seed=3, dtype=torch.float32)
    block.experts.config.router_aux_loss_coef = c
    cfg = hf_block_config(block)
    assert cfg.aux_loss_coef == pytest.approx(2 * c)  # K = 2
    layer = from_hf_block(block)
    x = torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(0))
    ours = layer(x).terms["switch"]
    logits, _, _ = block.gate(x)
    theirs = c * load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)


def test_overrides_refused_when_structural() -> None:
    from moe_dist import ConfigError
    with pytest.raises(ConfigError, match="top_k"):
        hf_block_config(make_block("qwen3_moe"), top_k=1)
    with pytest.raises(ConfigError, match="e_score_correction_bias"):
        hf_block_config(make_block("deepseek_v3"), bias_update_rate=0.0)


def test_qwen3_lm_ep2_dp2_matches_transformers(world4: list[dict]) -> None:
    """A parallelised tiny Qwen3-MoE LM over EP=2 x DP=2: logits, loss and synced grads equal the untouched
    transformers model on the concatenated batch (the mean of the ranks' losses is the objective)."""
    from transformers import AutoModelForCausalLM

    world, batches = 4, LM_BATCHES
    results = [r["lm"] for r in world4]
    torch.manual_seed(LM_SEED)
    ref = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).double()
    losses = []
    for r, (x, y) in enumerate(batches):
        logits = ref(input_ids=x, use_cache=False).logits
        close(results[r]["logits"], logits.detach(), f"rank {r} logits")
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        close(results[r]["loss"], loss.detach(), f"rank {r} loss")
        losses.append(loss)
    (sum(losses) / world).backward()
    ref_grads = dict(ref.named_parameters())
    for r, res in enumerate(results):
        lo, hi = res["ep_rank"] * 4, (res["ep_rank"] + 1) * 4
        for name, grad in res["grads"].items():
            hf_name = name.removeprefix("hf.")
            if ".mlp.moe." not in hf_name:
                close(grad, ref_grads[hf_name].grad, f"rank {r} {name}")
                continue
            block = hf_name.split(".mlp.moe.")[0] + ".mlp."
            if name.endswith("router.weight"):
                want = ref_grads[block + "gate.weight"].grad
            elif name.endswith("experts.w1"):
                want = ref_grads[block + "experts.gate_up_proj"].grad[lo:hi].transpose(1, 2)
            else:
                want = ref_grads[block + "experts.down_proj"].grad[lo:hi].transpose(1, 2)
            close(grad, want, f"rank {r} {name}")


def test_trainer_hf_resume_and_export(tmp_path: Path) -> None:
    """torchrun, 2 ranks, EP=2, model.kind=hf: steps 4-6 after a resume from step 3 equal the uninterrupted
    run's; the deepspeed launcher with engine=deepspeed (ZeRO-2) gives the same losses; the exported directory
    loads with from_pretrained and gives our model's logits, and an edited config.yaml does not change what
    it loads (the checkpoint's stored config is used). The export is ``python -m moe_dist.export_hf``'s
    ``main`` called with the command's arguments in this process (a subprocess would only add an interpreter
    start and the imports of torch and transformers)."""
    import yaml

    cfg = tiny(
        model={"kind": "hf", "hf_config": HF_TINY, "seq_len": 16},
        parallel={"ep": 2},
        train={"steps": 6, "ckpt_every": 3, "eval_every": 3, "keep_last": 3},
        out_dir=str(tmp_path / "runs"),
    )
    cfg["model"].pop("moe")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launch(torchrun_cmd(path, "full"), cwd=tmp_path, timeout=540, check=True)
    runs = tmp_path / "runs"
    shutil.copytree(runs / "full", runs / "cut")
    shutil.rmtree(runs / "cut" / "checkpoints" / "step_00000006")  # the copy resumes from step 3
    launch(torchrun_cmd(path, "cut"), cwd=tmp_path, timeout=540, check=True)

    def rows(name: str) -> dict[int, dict]:
        lines = (runs / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}

    full, cut = rows("full"), rows("cut")
    assert sorted(full) == sorted(cut) == list(range(6))
    for step in (3, 4, 5):  # the steps trained again after the resume
        for key in ("loss", "aux_loss", "grad_norm", "tokens_per_expert"):
            assert cut[step][key] == full[step][key], (step, key)

    if importlib.util.find_spec("deepspeed") is not None:
        # the DeepSpeed engine (ZeRO-2) trains the same HF model to the same losses, step by step
        launch(
            deepspeed_cmd(path, "ds", "engine=deepspeed", "deepspeed.zero_stage=2"),
            cwd=tmp_path,
            timeout=540,
            check=True,
        )
        ds = rows("ds")
        assert sorted(ds) == list(range(6))
        for step in range(6):
            assert ds[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6), step
        assert json.loads((runs / "ds" / "summary.json").read_text())["engine"] == "deepspeed"

    out = tmp_path / "export"
    from transformers import AutoModelForCausalLM

    from moe_dist.export_hf import load_run_model, main

    main([str(tmp_path / "runs" / "full"), str(out)])  # the command's own argv, in-process

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_run_model(tmp_path / "runs" / "full").eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = exported(input_ids=x, use_cache=False).logits
        got = ours(x).logits_BSV
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
    # the export builds the model from the config stored with the checkpoint, not the run's config.yaml,
    # which a user may edit after the run (here: another hidden size and depth)
    edited = yaml.safe_load((runs / "full" / "config.yaml").read_text())
    edited["model"]["hf_config"].update(hidden_size=64, num_hidden_layers=1)
    (runs / "full" / "config.yaml").write_text(yaml.safe_dump(edited))
    with torch.no_grad():
        assert torch.equal(load_run_model(runs / "full").eval()(x).logits_BSV, got)


def test_k8_blocks_dispatch_once_per_rank_by_default() -> None:
    """An HF block with K >= 8 (DeepSeek-V3's and Qwen3-MoE's published routers) gets ``dispatch: dedup``,
    a K = 2 one ``pairs``; ``model.hf_moe`` overrides either way."""
    for kind in ("deepseek_v3", "qwen3_moe"):
        block = make_block(kind)
        assert hf_block_config(block).dispatch == "pairs"
        block.gate.top_k = 8
        if kind == "deepseek_v3":  # every group may be chosen, so that 8 of its 8 experts can be
            block.gate.topk_group = block.gate.num_group
        assert hf_block_config(block).dispatch == "dedup"
        assert hf_block_config(block, dispatch="pairs").dispatch == "pairs"

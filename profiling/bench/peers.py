"""Other libraries' MoE layers for ``profiling.bench.layer``, on the benchmark's own ranks and inputs.

Shape legend: T tokens, D model dim, F expert FFN dim, E experts, K top-k.

Each builder returns ``(fn, params)``: ``fn`` maps x [T, D] to the layer's output [T, D] (no residual), and
``params`` are the tensors the benchmark's optimizer-like update touches. A peer that is not installed
raises ``PeerMissing``; the benchmark logs one line and goes on without it.

- DeepSpeed (``deepspeed.moe.layer.MoE``): takes any expert module; we give it the GELU FFN of width F
  (``bench_layer.DenseFFN``) and capacity 1.25, dropping tokens.
- torchtitan 0.3.0 (``torchtitan.models.common.moe.MoE``): SwiGLU experts (w1, w3: D -> F, w2: F -> D),
  dropless, expert-parallel over a DeviceMesh built on the benchmark's ranks. Its grouped experts always
  compute in bf16 (``GroupedExperts.forward`` casts activations and weights with ``.bfloat16()``), also
  when the benchmark runs in fp32.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger("moe_dist.bench")

Contestant = tuple[Callable[[Tensor], Tensor], list[nn.Parameter]]


class PeerMissing(RuntimeError):
    """The peer library is not installed (``pip install -e ".[bench]"``, see README)."""


def deepspeed_moe(
    expert: nn.Module, d: int, n: int, k: int, world: int, cf: float, skew: float | None
) -> Contestant:
    """DeepSpeed's MoE layer with ``expert`` copied into each of its local experts."""
    try:
        from deepspeed.moe.layer import MoE
    except ImportError as e:
        raise PeerMissing(f"DeepSpeed not importable: {e}") from e

    moe = MoE(
        hidden_size=d,
        expert=expert,
        num_experts=n,
        ep_size=world,
        k=k,
        capacity_factor=cf,
        eval_capacity_factor=cf,
        min_capacity=4,
        drop_tokens=True,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    if skew is not None:
        with torch.no_grad():
            wg = moe.deepspeed_moe.gate.wg.weight
            wg.zero_()
            wg[:, :n] = torch.eye(n)
    return (lambda x: moe(x)[0]), list(moe.parameters())


class Torchtitan:
    """Builds torchtitan 0.3.0 MoE layers, expert-parallel over all ranks of the default process group.

    Running it on CPU/gloo takes three settings (issue #16):
    1. ``triton`` must be installed: torchtitan imports it unconditionally (its MinimalAsyncEP kernels).
    2. ``torchtitan.distributed.parallel_dims.device_type = "cpu"``: that module read the device type at
       import, and without a GPU it reads "cuda".
    3. The ``partial_dtensor`` SPMD backend: the default (``spmd_types``) exchanges tokens with a list
       all-to-all, which gloo refuses for uneven chunks; ``partial_dtensor`` uses ``all_to_all_single``.

    Expert parallelism is applied as torchtitan's trainer applies it: ``set_moe_sharding_config`` puts the
    expert weights on the ``ep`` mesh axis, sharded on the expert dim (``Shard(0)``), and
    ``Module.parallelize(parallel_dims)`` makes them DTensors and wires the ``ep`` mesh into its
    ``AllToAllTokenDispatcher``. ``ParallelDims`` (dp_shard = world, ep = world) is built once, so every
    layer shares one mesh.
    """

    def __init__(self, world: int) -> None:
        try:
            import torchtitan.distributed.parallel_dims as parallel_dims_module
            import torchtitan.models.common.moe  # noqa: F401 - fail here, not in the first layer
            from torchtitan.distributed import utils as dist_utils
            from torchtitan.distributed.parallel_dims import ParallelDims
        except ImportError as e:
            raise PeerMissing(f"torchtitan not importable: {e}") from e
        # why: build_mesh gives its size-1 axes the "fake" backend, which this module registers; torchtitan's
        # trainer has it registered as a side effect of importing torch._dynamo
        import torch.testing._internal.distributed.fake_pg  # noqa: F401

        parallel_dims_module.device_type = "cpu"  # setting 2 above
        dist_utils.set_spmd_backend("partial_dtensor")  # setting 3 above
        self.parallel_dims = ParallelDims(
            dp_replicate=1,
            dp_shard=-1,
            cp=1,
            tp=1,
            pp=1,
            ep=world,
            world_size=world,
            spmd_backend="partial_dtensor",
        )
        self.parallel_dims.build_mesh()
        # why: its router computes the gate under autocast(float32), which CPU autocast does not support;
        # torch then turns autocast off for the gate (still fp32, as intended) and warns once per process
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")

    def moe(self, d: int, f: int, n: int, k: int, skew: float | None) -> Contestant:
        import spmd_types as spmd
        from torchtitan.models.common.config_utils import (
            make_moe_config,
            make_routed_experts_config,
            make_router_config,
        )
        from torchtitan.models.common.moe_sharding import set_moe_sharding_config

        def init(p: Tensor) -> None:
            nn.init.trunc_normal_(p, std=0.02)  # torchtitan's init_std

        cfg = make_moe_config(
            num_experts=n,
            router=make_router_config(
                dim=d, num_experts=n, gate_param_init={"weight": init}, top_k=k, score_func="softmax"
            ),
            routed_experts=make_routed_experts_config(
                dim=d,
                hidden_dim=f,
                num_experts=n,
                top_k=k,
                param_init={"w1_EFD": init, "w2_EDF": init, "w3_EFD": init},
                comm_backend="standard",  # AllToAllTokenDispatcher
            ),
        )
        set_moe_sharding_config(
            cfg,
            enable_ep=True,
            enable_sp=False,
            # the TP placements of the expert weights; unused with TP = 1 (as in its qwen3/deepseek_v3)
            expert_param_layout={"w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2), "w3_EFD": spmd.S(1)},
        )
        moe = cfg.build()
        moe.init_states()  # every rank draws the full weights from the same seed, then keeps its shard
        if skew is not None:
            with torch.no_grad():
                w = moe.router.gate.weight  # [E, D]
                w.zero_()
                w[:, :n] = torch.eye(n)
        moe.parallelize(self.parallel_dims)
        # its layer takes [B, L, D]: one sequence of T tokens
        return (lambda x: moe(x.unsqueeze(0)).squeeze(0)), list(moe.parameters())

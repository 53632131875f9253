"""The layout-independent (global) view of a model and its AdamW state, for checkpoints that any (world, EP)
can resume.

A rank holds its L expert slots of each MoE layer stacked, ``{layer}.experts.w1`` [L, D, W]; slot s holds
logical expert ``layer.slot_experts[s]`` (the layer's placement). The global view names every expert by its
logical id, ``{layer}.experts.e{id}.w1`` [D, W], and so does the optimizer state of those weights (exp_avg
and exp_avg_sq sliced the same way, the scalar ``step`` copied). Dense parameters and buffers (the router's
expert bias among them) are replicated and keep their names. A replicated expert (several slots) is
written once, from its first replica in EP-rank order (``layer.owned_slots``), and read into every slot
that holds it, optimizer state included; so a rank writes the keys of the experts it owns and reads back
the keys of every expert in its slots under the new layout and placement.

Contract with the model: every parameter under ``MoELayer.experts`` is stacked over the layer's local
slots on its first dim (``model.expert_params`` relies on the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moe_dist.moe.layer import MoELayer


@dataclass(frozen=True)
class ExpertSlot:
    """One stacked expert parameter of this rank: row s of ``{prefix}.{leaf}`` holds expert ``experts[s]``;
    this rank writes the rows in ``owned`` (first replicas)."""

    prefix: str
    leaf: str
    experts: tuple[int, ...]
    owned: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.experts)

    def key(self, expert_id: int) -> str:
        return f"{self.prefix}.e{expert_id}.{self.leaf}"

    def keys(self) -> list[str]:
        """The key of every row (replicas of one expert share it): what a load reads."""
        return [self.key(e) for e in self.experts]

    def owned_keys(self) -> list[tuple[int, str]]:
        """(row, key) of the rows this rank writes: each expert once over the EP group."""
        return [(s, self.key(self.experts[s])) for s in self.owned]


def expert_slots(model: nn.Module) -> dict[str, ExpertSlot]:
    """Stacked expert parameter name -> its slot table, for every MoE layer of ``model``."""
    slots: dict[str, ExpertSlot] = {}
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            prefix = f"{name}.experts" if name else "experts"
            ids, owned = tuple(m.slot_experts), tuple(m.owned_slots)
            for leaf, _ in m.experts.named_parameters():
                slots[f"{prefix}.{leaf}"] = ExpertSlot(prefix, leaf, ids, owned)
    return slots


def layer_placements(model: nn.Module) -> dict[str, dict]:
    """Each MoE layer's placement (``Placement.to_dict``) by module name: stored in checkpoints."""
    return {name: m.placement.to_dict() for name, m in model.named_modules() if isinstance(m, MoELayer)}


def owned_expert_ids(model: nn.Module) -> list[list[int]]:
    """Per EP rank, the expert ids (over all MoE layers) whose first replica it holds: what its experts
    file of a checkpoint contains. Every rank computes it for every rank (placements are global)."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    ep = layers[0].ep_size if layers else 1
    owned: list[set[int]] = [set() for _ in range(ep)]
    for m in layers:
        for e in range(m.placement.num_experts):
            owned[m.placement.owner(e)[0]].add(e)
    return [sorted(ids) for ids in owned]


def split_model(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(dense, experts): the state dict with each stacked expert tensor split into per-expert keys."""
    slots = expert_slots(model)
    dense, experts = {}, {}
    for name, t in model.state_dict().items():
        slot = slots.get(name)
        if slot is None:
            dense[name] = t.detach()
        else:
            for s, key in slot.owned_keys():
                experts[key] = t[s].detach().clone()  # why clone: a view would save the whole stack
    return dense, experts


def join_model(model: nn.Module, dense: dict[str, Tensor], experts: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's state dict, built from the global view (its experts stacked from their keys)."""
    state = dict(dense)
    for name, slot in expert_slots(model).items():
        state[name] = torch.stack([_need(experts, k, "expert weight") for k in slot.keys()])
    return state


def _need(table: dict[str, Any], key: str, what: str) -> Any:
    try:
        return table[key]
    except KeyError:
        raise KeyError(f"the checkpoint has no {what} {key}") from None


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's params in its state_dict index order (groups in order, then params)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def split_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, dict], dict[str, dict], list[dict]]:
    """(dense, experts, groups): per-param state keyed by name (experts per expert id) and each param
    group's hyperparameters with the names of its params instead of their indices."""
    sd = optimizer.state_dict()
    names = _param_names(model, optimizer)
    slots = expert_slots(model)
    dense: dict[str, dict] = {}
    experts: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        name = names[idx]
        slot = slots.get(name)
        if slot is None:
            dense[name] = st
            continue
        for s, key in slot.owned_keys():
            # why by shape: exp_avg/exp_avg_sq are stacked like the param; ``step`` is one scalar for all
            experts[key] = {
                k: v[s].clone() if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == slot.count else v
                for k, v in st.items()
            }
    groups = []
    for g in sd["param_groups"]:
        group = {k: v for k, v in g.items() if k != "params"}
        group["param_names"] = [names[i] for i in g["params"]]
        groups.append(group)
    return dense, experts, groups


def join_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, dense: dict, experts: dict, groups: list[dict]
) -> dict[str, Any]:
    """This rank's optimizer state_dict built from the global view (see ``split_optimizer``)."""
    names = _param_names(model, optimizer)
    slots = expert_slots(model)
    live = optimizer.state_dict()["param_groups"]
    if len(groups) != len(live):
        raise ValueError(f"the checkpoint has {len(groups)} optimizer param groups, this model {len(live)}")
    state: dict[int, dict] = {}
    for idx, name in enumerate(names):
        slot = slots.get(name)
        if slot is None:
            if name in dense:
                state[idx] = dense[name]
            continue
        per_expert = [experts.get(k) for k in slot.keys()]
        if all(s is None for s in per_expert):
            continue  # never stepped
        per_expert = [_need(experts, k, "optimizer state for expert weight") for k in slot.keys()]
        joined = {}
        for k, v in per_expert[0].items():
            if isinstance(v, Tensor) and v.dim() > 0:
                joined[k] = torch.stack([s[k] for s in per_expert])
            else:
                joined[k] = v
        state[idx] = joined
    param_groups = []
    for saved, now in zip(groups, live, strict=True):
        if saved["param_names"] != [names[i] for i in now["params"]]:
            raise ValueError("the checkpoint's optimizer param groups hold other params than this model's")
        group = {k: v for k, v in saved.items() if k != "param_names"}
        group["params"] = now["params"]
        param_groups.append(group)
    return {"state": state, "param_groups": param_groups}

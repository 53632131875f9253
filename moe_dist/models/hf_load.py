"""Pretrained transformers checkpoints (``model.hf_pretrained: DIR``): a directory with ``config.json`` and
``*.safetensors`` (one ``model.safetensors``, or shards named by ``model.safetensors.index.json``).

    model = pretrained_skeleton(path, seq_len)               # the LM on the meta device: no tensor read
    stats = load_pretrained(model, path, layout, placement)  # this rank's tensors, its blocks swapped

Each rank reads the dense tensors and only the experts its EP slots hold (with replicas, every slot of an
expert gets it; an expert is read once), lazily through ``safetensors.safe_open``: whole tensors for the
per-expert layout (``{layer}.{disk_block}.experts.{e}.{gate,up,down}`` names from the family's ``HFFamily``
row), one row of ``get_slice`` for the fused ``experts.gate_up_proj``/``down_proj``. ``plan`` maps every
tensor the model needs to its checkpoint key from the safetensors headers alone, so a missing shard or key
is refused before any process group (``check_pretrained``).

Shape legend: N experts, L local slots, D model dim, F expert ffn dim.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_dist.errors import ConfigError
from moe_dist.models.hf import HFMoEBlock, _set_submodule, family_of, from_hf_block, sparse_blocks
from moe_dist.models.hf_config import hf_config_from
from moe_dist.models.hf_families import BLOCK_KINDS, FUSED_EXPERTS, HFFamily
from moe_dist.moe.placement import Placement

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
LOAD_RECORD = "hf_load.json"
"""The run directory's record of the load: one row per rank (bytes_read, checkpoint_bytes, peak RSS)."""


class Checkpoint:
    """A safetensors checkpoint directory: which file holds each key (headers and the index only), and
    the tensors read so far (``bytes_read``)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        where = f"model.hf_pretrained={str(path)!r}"
        index = self.path / INDEX
        if index.is_file():
            try:
                self.file_of: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{where}: {INDEX} is not a safetensors index ({e})") from None
        elif (self.path / SINGLE).is_file():
            self.file_of = {}
        else:
            raise ConfigError(f"{where} holds neither {SINGLE} nor {INDEX}")
        files = sorted(set(self.file_of.values())) or [SINGLE]
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise ConfigError(
                f"{where}: shard {missing[0]} named by {INDEX} is missing ({len(missing)} missing)"
            )
        if not self.file_of:
            with safe_open(str(self.path / SINGLE), framework="pt") as sf:
                self.file_of = {k: SINGLE for k in sf.keys()}
        self.checkpoint_bytes = sum((self.path / f).stat().st_size for f in files)
        self.bytes_read = 0
        self._open: dict[str, Any] = {}
        self._pending: dict[str, int] = {}
        """Reads still planned per file (``plan_reads``): a file is unmapped after its last one."""

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def _file(self, key: str):
        from safetensors import safe_open

        name = self.file_of[key]
        if name not in self._open:
            self._open[name] = safe_open(str(self.path / name), framework="pt")
        return self._open[name]

    def shape(self, key: str) -> list[int]:
        return list(self._file(key).get_slice(key).get_shape())

    def plan_reads(self, keys: list[str]) -> None:
        """The reads to come (a key once per ``tensor``/``row`` call). Why: the pages of a memory-mapped
        shard count in the process's RSS until it is unmapped, so each file is closed after its last read
        rather than at the end (measured: the mapped pages doubled the load's peak RSS)."""
        for key in keys:
            name = self.file_of[key]
            self._pending[name] = self._pending.get(name, 0) + 1

    def _done(self, key: str) -> None:
        name = self.file_of[key]
        if name in self._pending:
            self._pending[name] -= 1
            if self._pending[name] <= 0:
                del self._pending[name]
                self._open.pop(name, None)

    def tensor(self, key: str) -> Tensor:
        t = self._file(key).get_tensor(key)
        self.bytes_read += t.numel() * t.element_size()
        self._done(key)
        return t

    def row(self, key: str, i: int) -> Tensor:
        """Row ``i`` of a tensor: only its bytes are read."""
        t = self._file(key).get_slice(key)[i]
        self.bytes_read += t.numel() * t.element_size()
        self._done(key)
        return t

    def close(self) -> None:
        self._open.clear()
        self._pending.clear()


@dataclass
class BlockSource:
    """Where one sparse block's experts live in the checkpoint."""

    name: str
    """The block's qualified name in the model."""
    fused: tuple[str, str] | None
    """(gate_up_proj key, down_proj key) of the fused layout; None: per-expert keys."""
    per_expert: list[tuple[str, str, str]] = field(default_factory=list)
    """(gate, up, down) keys of each expert e, in expert order (per-expert layout)."""


@dataclass
class Plan:
    dense: dict[str, str]
    """Model state-dict key (outside the experts) -> checkpoint key."""
    blocks: list[BlockSource]


def _candidates(key: str, block: str, fam: HFFamily) -> list[str]:
    """The checkpoint names of the model key ``key`` inside sparse block ``block`` (transformers 5.x's name,
    then the published one with the family's ``disk_block``)."""
    parent, _, attr = block.rpartition(".")
    disk = f"{parent}.{fam.disk_block}" if parent else fam.disk_block
    out = [key]
    if disk != block:
        out.append(disk + key[len(block):])
    return out


def plan(model: nn.Module, ckpt: Checkpoint) -> Plan:
    """Every tensor ``model`` (still holding its transformers blocks) needs, mapped to checkpoint keys from
    the headers alone; a missing key is one ConfigError."""
    blocks = sparse_blocks(model)
    missing: list[str] = []

    def find(names: list[str]) -> str | None:
        hit = next((n for n in names if n in ckpt), None)
        if hit is None:
            missing.append(names[-1])
        return hit

    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    dense: dict[str, str] = {}
    sources: list[BlockSource] = []
    for key in model.state_dict():
        owner = next(((b, m) for b, m in blocks if key.startswith(b + ".")), None)
        if owner is not None and key.rpartition(".")[2] in FUSED_EXPERTS and ".experts." in key:
            continue  # the experts, below
        names = _candidates(key, *owner[0:1], family_of(owner[1])) if owner else [key]
        if key in tied and not any(n in ckpt for n in names):
            continue  # tied to another weight (tie_weights after the load)
        hit = find(names)
        if hit is not None:
            dense[key] = hit
    for name, block in blocks:
        fam = family_of(block)
        n = int(block.gate.weight.shape[0])
        gate_up = _candidates(f"{name}.experts.{FUSED_EXPERTS[0]}", name, fam)
        down = _candidates(f"{name}.experts.{FUSED_EXPERTS[1]}", name, fam)
        fused = next(((g, d) for g, d in zip(gate_up, down, strict=True) if g in ckpt and d in ckpt), None)
        if fused is not None:
            want = [list(block.experts.gate_up_proj.shape), list(block.experts.down_proj.shape)]
            got = [ckpt.shape(fused[0]), ckpt.shape(fused[1])]
            if got != want:
                raise ConfigError(
                    f"model.hf_pretrained: {fused[0]}/{fused[1]} have shapes {got}, expected {want}"
                )
            sources.append(BlockSource(name, fused))
            continue
        src = BlockSource(name, None)
        for e in range(n):
            keys = []
            for w in fam.expert_weights:
                hit = find(_candidates(f"{name}.experts.{e}.{w}.weight", name, fam))
                keys.append(hit or "")
            src.per_expert.append((keys[0], keys[1], keys[2]))
        sources.append(src)
    if missing:
        raise ConfigError(
            f"model.hf_pretrained={str(ckpt.path)!r} lacks {missing[0]}"
            + (f" and {len(missing) - 1} more key(s)" if len(missing) > 1 else "")
        )
    return Plan(dense, sources)


def pretrained_skeleton(path: str | Path, seq_len: int | None = None) -> nn.Module:
    """The causal LM of ``path/config.json`` on the meta device (fp32): its structure, no storage."""
    from transformers import AutoModelForCausalLM

    config = hf_config_from(str(path), seq_len)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if not sparse_blocks(model):
        raise ConfigError(
            f"model.hf_pretrained={str(path)!r} ({config.model_type}) is not a sparse-MoE model"
        )
    return model


def check_pretrained(path: str | Path, seq_len: int | None = None) -> None:
    """The launch's check (no tensor read): an MoE config, every shard and every key present."""
    model = pretrained_skeleton(path, seq_len)  # first: a dense config is refused as such, files or not
    plan(model, Checkpoint(path))


@dataclass
class LoadStats:
    rank: int
    bytes_read: int
    checkpoint_bytes: int
    peak_rss_bytes: int
    seconds: float
    read: bool = True
    """False: the weights were not read (a checkpoint of the run will be resumed; the structure only)."""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _expert_rows(
    ckpt: Checkpoint, src: BlockSource, ids: list[int], transposed: bool, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The slots' experts in transformers' in-memory layout (fp32 on ``device``): gate_up [L, 2F, D], down
    [L, D, F] (transposed: [L, D, 2F], [L, F, D]); each distinct expert read once, a replica copied from the
    slot read first.

    Why each expert is written straight into one preallocated buffer (no per-expert cat, no stack): the
    buffer is one large allocation, returned to the system when freed, where a list of per-expert copies
    left the allocator's heap a layer's worth larger each layer (measured: peak RSS 2.9x the bytes loaded)."""
    gate_up: Tensor | None = None
    down: Tensor | None = None
    first: dict[int, int] = {}
    for s, e in enumerate(ids):
        if e in first:
            gate_up[s].copy_(gate_up[first[e]])  # type: ignore[index]
            down[s].copy_(down[first[e]])  # type: ignore[index]
            continue
        first[e] = s
        if src.fused is not None:
            parts: tuple[Tensor, ...] = (ckpt.row(src.fused[0], e), ckpt.row(src.fused[1], e))
        else:
            gate_FD, up_FD, down_DF = (ckpt.tensor(k) for k in src.per_expert[e])
            f, d = gate_FD.shape
            if transposed:
                parts = (gate_FD.t(), up_FD.t(), down_DF.t())
            else:
                parts = (gate_FD, up_FD, down_DF)
        if gate_up is None:
            if src.fused is not None:
                gu_shape, dn_shape = tuple(parts[0].shape), tuple(parts[1].shape)
            else:
                gu_shape = (d, 2 * f) if transposed else (2 * f, d)
                dn_shape = tuple(parts[2].shape)
            gate_up = torch.empty((len(ids), *gu_shape), dtype=torch.float32, device=device)
            down = torch.empty((len(ids), *dn_shape), dtype=torch.float32, device=device)
        if src.fused is not None:
            gate_up[s].copy_(parts[0])
            down[s].copy_(parts[1])  # type: ignore[index]
        elif transposed:  # [D, 2F] = [gate^T | up^T]
            gate_up[s, :, :f].copy_(parts[0])
            gate_up[s, :, f:].copy_(parts[1])
            down[s].copy_(parts[2])  # type: ignore[index]
        else:  # [2F, D]: gate rows, then up rows
            gate_up[s, :f].copy_(parts[0])
            gate_up[s, f:].copy_(parts[1])
            down[s].copy_(parts[2])  # type: ignore[index]
    assert gate_up is not None and down is not None, "a sparse block with no slot"
    return gate_up, down


def _in_blocks(module: nn.Module) -> bool:
    """A swapped block (real tensors) or a transformers sparse block (its experts are read per slot)."""
    return isinstance(module, HFMoEBlock) or type(module).__name__ in BLOCK_KINDS


def _off_meta(module: nn.Module, device: torch.device) -> None:
    """Storage for every meta parameter and buffer outside the sparse blocks."""
    if _in_blocks(module):
        return
    for name, p in list(module.named_parameters(recurse=False)):
        if p.is_meta:
            setattr(module, name, nn.Parameter(torch.empty_like(p, device=device), p.requires_grad))
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.is_meta:
            module._buffers[name] = torch.empty_like(b, device=device)
    for child in module.children():
        _off_meta(child, device)


@torch.no_grad()
def load_pretrained(
    model: nn.Module,
    path: str | Path,
    layout=None,
    placement: Placement | None = None,
    timing_hook=None,
    device: torch.device | str = "cpu",
    read: bool = True,
    **overrides: Any,
) -> LoadStats:
    """Fill ``pretrained_skeleton``'s model from ``path`` (in place): the dense tensors, and of each sparse
    block only this rank's slots' experts (``placement``; None: contiguous), its block swapped for an
    expert-parallel ``HFMoEBlock`` as ``parallelize_hf_model`` does. Returns what was read.

    ``read=False``: no tensor is read (nor a safetensors header): the same model with uninitialized storage,
    for a launch that resumes a checkpoint of its own, which overwrites every weight."""
    t0 = time.perf_counter()
    device = torch.device(device)
    ckpt = Checkpoint(path) if read else None
    skeleton = Plan({}, [BlockSource(n, None) for n, _ in sparse_blocks(model)])  # no key: nothing read
    p = plan(model, ckpt) if ckpt is not None else skeleton
    ep_group = layout.ep_group if layout is not None else None
    balance_group = layout.balance_group if layout is not None else None
    config = model.config
    by_name = dict(sparse_blocks(model))
    ep_rank = layout.ep_rank if layout is not None else 0  # the rank of ep_group (ranks dp*ep + e)

    slots: dict[str, tuple[Placement, list[int]]] = {}
    for src in p.blocks:
        n = int(by_name[src.name].gate.weight.shape[0])
        pl = placement or Placement.contiguous(n, layout.ep if layout is not None else 1)
        slots[src.name] = (pl, list(pl.slot_expert_RL[ep_rank]))
    reads = list(p.dense.values())
    for src in p.blocks if ckpt is not None else ():
        for e in set(slots[src.name][1]):
            reads.extend(src.fused if src.fused is not None else src.per_expert[e])
    if ckpt is not None:
        ckpt.plan_reads(reads)
    # why the dense tensors first: a shard is unmapped after its last read, and the attention weights of
    # layer l sit in the shards of layer l's experts
    _off_meta(model, device)
    in_blocks = {id(m) for _, b in by_name.items() for m in b.modules()}
    for module in model.modules():  # non-persistent buffers (rotary inv_freq) are computed, not stored
        if module._non_persistent_buffers_set and id(module) not in in_blocks:
            model._init_weights(module)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for key, disk in p.dense.items():
        if any(key.startswith(b.name + ".") for b in p.blocks):
            continue  # loaded with its block below
        target = params.get(key, buffers.get(key))
        if target is not None:
            target.copy_(ckpt.tensor(disk))
    del params, buffers
    for i, src in enumerate(p.blocks):
        block = by_name.pop(src.name)  # why pop: the replaced block (and its expert buffers) is freed below
        fam = family_of(block)
        pl, ids = slots[src.name]
        for attr in filter(None, ("gate", fam.shared_expert, fam.shared_expert_gate)):
            getattr(block, attr).to_empty(device=device)
        for name, t in list(block.state_dict(keep_vars=True).items()):
            full = f"{src.name}.{name}"
            if full in p.dense:
                t.copy_(ckpt.tensor(p.dense[full]))  # type: ignore[union-attr]
        transposed = bool(getattr(block.experts, "is_transposed", False))
        if ckpt is not None:
            gate_up, down = _expert_rows(ckpt, src, ids, transposed, device)
        else:  # the slots' shapes, from the meta block: [L, 2F, D] and [L, D, F] (or transposed)
            gu, dn = (getattr(block.experts, w) for w in FUSED_EXPERTS)
            gate_up = torch.empty((len(ids), *gu.shape[1:]), dtype=torch.float32, device=device)
            down = torch.empty((len(ids), *dn.shape[1:]), dtype=torch.float32, device=device)
        block.experts.gate_up_proj = nn.Parameter(gate_up)
        block.experts.down_proj = nn.Parameter(down)
        layer_idx = int(src.name.split("layers.")[1].split(".")[0]) if "layers." in src.name else i
        layer = from_hf_block(
            block, ep_group, balance_group, layer_idx, config, timing_hook, pl, slot_rows=True, **overrides
        )
        _set_submodule(model, src.name, HFMoEBlock(layer))
        del block, gate_up, down, layer  # the transformers block's expert buffers go now, not at the end
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if getattr(config, "output_router_logits", False):
        config.output_router_logits = False  # our layers report their own aux loss (parallelize_hf_model)
    rank = layout.rank if layout is not None else 0
    stats = LoadStats(
        rank=rank,
        bytes_read=ckpt.bytes_read if ckpt is not None else 0,
        checkpoint_bytes=ckpt.checkpoint_bytes if ckpt is not None else 0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        seconds=time.perf_counter() - t0,
        read=ckpt is not None,
    )
    if ckpt is None:
        log.info("rank %d: the run's checkpoint will be resumed: %s's weights not read", rank, path)
        return stats
    ckpt.close()
    log.info(
        "rank %d read %.2f MB of the checkpoint's %.2f MB in %.2f s; peak RSS %.0f MB",
        rank,
        stats.bytes_read / 1e6,
        stats.checkpoint_bytes / 1e6,
        stats.seconds,
        stats.peak_rss_bytes / 1e6,
    )
    return stats

"""Data-parallel training over many processes and machines with FSDP2, applied to the model from outside.

The model (`model.py`) is written for one device and holds no process-group state; this module wraps it.

Notable features:
- `init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and starts the
  default process group: NCCL with one GPU per process (cuda:LOCAL_RANK), gloo on the CPU. Without torchrun, or
  with one process, it starts nothing, and every helper here reduces to the single-process behaviour.
- `parallelize` shards the model with FSDP2 (`fully_shard`): one communication group per Block (each main layer and
  each MTP module's block), then the root (embedding, final norm, head, the MTP projections and norms).
  Parameters, gradients and optimiser states become DTensors sharded on dim 0; gradients are reduce-scattered and
  averaged over ranks. With `param_dtype=torch.bfloat16` parameters are all-gathered in bf16 and gradients reduced
  in fp32, except the MoE gates: routing decides experts on near-ties, so each gate is a group of its own kept fp32.
  Activation checkpointing stays the model's own per-Block flag (`Block.checkpoint`).
- The chunked loss reads `model.lm_head.weight` after forward. FSDP2 does not reshard the root after forward, so
  there it is the full (unsharded) tensor, and its gradient reaches the root's reduce-scatter like any other.
- Buffers are not FSDP's business: every rank holds a full copy of each gate's `e_score_correction_bias` and
  nothing synchronises it. `all_reduce_loads` sums the per-expert token counts over ranks, so every rank applies
  the same bias update; `gather_model` checks that the buffers agree on every rank before it writes them once.
- `gather_model` gives rank 0 a full CPU copy of a sharded model for `save_model`, so a sharded run writes the
  same HF checkpoint as a single process; `load_full_state_dict` loads such a checkpoint back into shards.
- The optimiser state stays sharded on disk: `save_optimizer` / `load_optimizer` use torch.distributed.checkpoint,
  one file per rank plus metadata, in a folder every rank can reach (a shared file system across machines).
- Metrics are global: `all_reduce_mean` averages a step's losses over ranks (gloo has no AVG: SUM, then divide),
  `grad_norm` is the norm of the whole model's gradient, not of one rank's shard, so clipping by it scales every
  shard alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .model import MoE, Rotary, Transformer


# ---- process group -----------------------------------------------------------------------------------------------
def init_distributed(device: str | None = None) -> tuple[int, int, int, torch.device]:
    """(rank, world_size, local_rank, device) of this process, starting the process group under torchrun.

    `device` picks the kind ("cuda" or "cpu"; None: cuda when there is one); under torchrun the CUDA index is
    LOCAL_RANK's. Calling it again returns the same answer without starting a second group."""
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, torch.device(device) if device else torch.device(kind)
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set: launch with torchrun")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible: "
                             "start at most one process per GPU (--nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"distributed training runs on cuda or cpu, not {kind!r}")
    if not dist.is_initialized():
        if kind == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return rank, world, local, dev


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors (and CUDA ones through the host).
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a picklable value, e.g. the name of a temporary folder)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- sharding ----------------------------------------------------------------------------------------------------
def parallelize(model: Transformer, mesh: DeviceMesh | dist.ProcessGroup | None = None,
                param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> Transformer:
    """Shard `model` in place with FSDP2 over `mesh`: a 1-D DeviceMesh, a process group, or None for all ranks.

    param_dtype: the dtype parameters are all-gathered in for compute (None: their own, fp32); gradients are
    always reduced in fp32. reshard_after_forward=False keeps each Block's full parameters from forward to
    backward: one all-gather fewer per Block, at the memory cost of the whole unsharded model."""
    if not dist.is_initialized():
        raise ValueError("parallelize needs a process group: launch with torchrun and call init_distributed first")
    device_type = next(model.parameters()).device.type
    if mesh is None:
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    elif isinstance(mesh, dist.ProcessGroup):
        mesh = DeviceMesh.from_group(mesh, device_type)
    if mesh.ndim != 1:
        raise ValueError(f"parallelize shards over a 1-D mesh, got {mesh.ndim} dimensions")
    # cast_forward_inputs=False: a Block's cos/sin are fp32 on purpose (RoPE angles reach thousands of radians);
    # autocast, not FSDP, decides the compute dtype of activations.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        if param_dtype not in (None, torch.float32) and isinstance(block.mlp, MoE):
            # Routing picks experts on near-ties, so the gate keeps computing with fp32 weights: a group of its
            # own, gathered in fp32 (one more, small, all-gather per MoE layer).
            fully_shard(block.mlp.gate, mesh=mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def accumulation_steps(batch_size: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per rank per optimiser step; batch_size is global, micro_batch per rank."""
    per_step = micro_batch * world_size
    if micro_batch < 1 or batch_size < per_step or batch_size % per_step:
        raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of micro_batch x world_size "
                         f"({micro_batch} x {world_size} = {per_step})")
    return batch_size // per_step


# ---- global quantities -------------------------------------------------------------------------------------------
@torch.no_grad()
def all_reduce_loads(loads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each layer's per-expert token counts over ranks, in place (one collective for all layers)."""
    if not _active() or not loads:
        return loads
    stacked = torch.stack(loads).to(_comm_device())  # [layers, E]
    dist.all_reduce(stacked)
    for load, total in zip(loads, stacked.to(loads[0].device)):
        load.copy_(total)
    return loads


@torch.no_grad()
def all_reduce_mean(values: dict) -> dict:
    """Average a dict of scalars (tensors or floats, or lists of them) over ranks; same keys and layout back."""
    if not _active():
        return values
    flat, layout = [], {}
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        layout[key] = (len(flat), len(items), isinstance(value, list))
        flat.extend(items)
    device = _comm_device()
    summed = torch.stack([torch.as_tensor(x, dtype=torch.float32).to(device).reshape(()) for x in flat])
    dist.all_reduce(summed)
    mean = (summed / dist.get_world_size()).cpu().unbind()
    return {key: list(mean[i:i + n]) if is_list else mean[i] for key, (i, n, is_list) in layout.items()}


@torch.no_grad()
def grad_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (sharded gradients included), the same on every rank."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # each rank's partial norm, reduced over ranks
    return norm


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that clips a gradient of this norm to max_norm (1 below it), as torch.nn.utils computes it."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


# ---- state in and out --------------------------------------------------------------------------------------------
@torch.no_grad()
def check_replicated(model: nn.Module) -> None:
    """Raise if any buffer (the routing biases above all) differs between ranks; FSDP leaves buffers unsynchronised."""
    if not _active():
        return
    named = list(model.named_buffers())
    if not named:
        return
    device = _comm_device()
    mine = torch.cat([b.detach().float().flatten() for _, b in named]).to(device)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    sizes = [b.numel() for _, b in named]
    differs = torch.stack([(a != b).any() for a, b in zip(mine.split(sizes), ref.split(sizes))]).int()
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    bad = [name for (name, _), d in zip(named, differs.tolist()) if d]
    if bad:
        raise RuntimeError(f"buffers differ between ranks: {', '.join(bad)} (were the MoE loads all-reduced "
                           "before update_bias on every rank?)")


def gather_model(model: Transformer) -> Transformer | None:
    """A full model for saving. A plain model is returned as it is; a sharded one is gathered (a collective: every
    rank calls it) into an fp32 CPU copy on rank 0, and the other ranks get None."""
    if not isinstance(model, FSDPModule):
        return model
    check_replicated(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        full = Transformer(model.cfg)
    full.load_state_dict(state, assign=True)
    full.rotary = Rotary(model.cfg)  # its frequencies are a non-persistent buffer, not in the state dict
    return full


def load_full_state_dict(model: Transformer, state_dict: dict[str, torch.Tensor]) -> None:
    """Load full tensors (e.g. an HF checkpoint's, present on every rank) into a plain or a sharded model."""
    if isinstance(model, FSDPModule):
        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state_dict)


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Every rank writes its shard of the optimiser state into folder `path` (a collective)."""
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Read what `save_optimizer` wrote; the model must be sharded the same way or be resharded by DCP."""
    if not (Path(path) / ".metadata").is_file():
        raise FileNotFoundError(f"{path} holds no sharded optimiser state (no .metadata)")
    # The template: states of the right shapes and shards, which DCP fills in place.
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])

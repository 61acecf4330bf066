"""Several processes, one result: the torchrun launch, DDP / FSDP2 wrapping, and rank-0-only writes.

    SLIMFORGE_NPROC=2 dvc repro lora          # a training stage on 2 GPUs (2 CPU processes: gloo)
    torchrun --standalone --nproc-per-node 2 -m stages.lora --params params/lora.yaml ...   # by hand

A training stage's command in dvc.yaml stays `python -m stages.<name> ...`; with SLIMFORGE_NPROC=N
(N > 1) it re-executes itself under `torch.distributed.run` (slimforge.stage.stage_main). Every rank
then runs the stage's whole code, so every rank reaches the same training calls in the same order;
only rank 0 writes outputs, metrics, plots, checkpoints and MLflow runs (the others write into a
temporary folder that is deleted). The training loop (slimforge.training) shards each global batch
across ranks and weights every micro-batch by its share of the global batch's response tokens, so
the result does not depend on the number of processes (up to float summation order).

DDP when the training state fits the device, FSDP2 (`fully_shard` per decoder layer, then the root)
when it does not: `Schedule.shard` is "auto", "ddp" or "fsdp"; "auto" compares
`training_state_bytes` with `memory_budget_gb` (0: the device's memory). A budget > 0 is also
enforced on CUDA (`torch.cuda.set_per_process_memory_fraction`), so a run that would not fit a
smaller GPU fails here too.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import sys

import torch
import torch.distributed as dist

from slimforge import SlimforgeError

NPROC_ENV = "SLIMFORGE_NPROC"
STRATEGIES = ("auto", "ddp", "fsdp")


def requested_nproc() -> int:
    """SLIMFORGE_NPROC as a number (1 when unset)."""
    raw = os.environ.get(NPROC_ENV, "1").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise SlimforgeError(f"{NPROC_ENV}={raw!r}: must be a whole number >= 1 (processes per node)")
    return int(raw)


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch_command(entry_module: str, argv: list[str], nproc: int) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m <entry> <argv>`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", entry_module, *argv]


def init() -> None:
    """Join the process group torchrun set up: NCCL with one GPU per local rank, else gloo.
    A no-op in a single process."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(shutdown)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0, the one process that writes (always True in a single process)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks (a copy; `t` itself in a single process)."""
    if world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def sum_grads(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over ranks (one flat all-reduce; a missing
    gradient counts as zeros). For small trainable sets whose forward passes are not one module's
    (the rl loop's adapter: rollouts run on the KV cache, outside any wrapper)."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).to(p.dtype, copy=True)


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in a single process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_slice(items: list, world: int, rank: int) -> list:
    """This rank's contiguous share of one global batch (sizes differ by at most one); the shares,
    concatenated in rank order, are the batch, so the data order is the single process's. Uneven
    shares are fine: the loop weights each micro-batch by its tokens and every rank reduces
    gradients once per step."""
    if len(items) < world:
        raise SlimforgeError(f"a batch of {len(items)} sequences cannot feed {world} processes: "
                             f"use batch_size >= {world} (and at least as many examples)")
    return even_parts(items, world)[rank]


def even_parts(items: list, n: int) -> list[list]:
    """`items` cut into `n` contiguous parts whose sizes differ by at most one (some empty if n > len)."""
    share, extra = divmod(len(items), n)
    starts = [j * share + min(j, extra) for j in range(n + 1)]
    return [items[starts[j]:starts[j + 1]] for j in range(n)]


def training_state_bytes(model: torch.nn.Module) -> int:
    """Weights as stored, plus each trainable parameter's gradient and AdamW's two moments (all in
    the parameter's dtype, as torch keeps them): what DDP holds on every device before activations."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() * 3 for p in model.parameters() if p.requires_grad)
    return weights + trainable


def choose_strategy(model: torch.nn.Module, strategy: str, memory_budget_gb: float) -> str:
    """"ddp" or "fsdp" ("auto": FSDP2 when the training state exceeds the budget)."""
    if strategy not in STRATEGIES:
        raise SlimforgeError(f"shard {strategy!r} is not supported (allowed: {', '.join(STRATEGIES)})")
    if strategy != "auto":
        return strategy
    return "fsdp" if training_state_bytes(model) > budget_bytes(model, memory_budget_gb) else "ddp"


def budget_bytes(model: torch.nn.Module, memory_budget_gb: float) -> float:
    device = next(model.parameters()).device
    if memory_budget_gb > 0:
        return memory_budget_gb * 2 ** 30
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return float("inf")  # a CPU run: host memory is not this loop's to budget


def enforce_budget(device: torch.device, memory_budget_gb: float) -> None:
    """Cap this process's CUDA allocations at the budget (no-op on the CPU or without a budget)."""
    if device.type == "cuda" and memory_budget_gb > 0:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_budget_gb * 2 ** 30 / total), device)


def _layer_classes(model: torch.nn.Module) -> set[str]:
    """The decoder-layer class names HF declares as unsplittable (`_no_split_modules`), PEFT-wrapped or not."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def wrap(model: torch.nn.Module, strategy: str) -> torch.nn.Module:
    """The module to train across ranks: `model` under DDP (sharing its parameters), or for "fsdp"
    a copy of `model` sharded with FSDP2 per decoder layer and at the root, on this rank's device;
    `model` itself then waits on the CPU and gets the trained weights back from `gather_into`. In a single
    process, `model` itself."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # No buffer broadcast: every rank built the same buffers (RoPE tables, packed weights), and
        # a packed quantized model's are most of its bytes.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    # The copy is built on the CPU and each layer's shard moves to the device as it is sharded, so a
    # device holds 1/N of the weights; the caller's model waits on the CPU.
    model.to("cpu")
    sharded = copy.deepcopy(model)
    layers = _layer_classes(sharded)
    for m in sharded.modules():
        if type(m).__name__ in layers:
            fully_shard(m, mesh=mesh)
    fully_shard(sharded, mesh=mesh)  # moves each shard to the mesh's device
    return sharded


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside a DDP wrapper (anything else as it is)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole, on the CPU: a collective under FSDP2 (every rank calls it; each gets it)."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in unwrap(module).state_dict().items()}
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in module.state_dict().items()}


def gather_into(sharded: torch.nn.Module, model: torch.nn.Module, device: torch.device) -> None:
    """Copy the trained weights of an FSDP2 copy back into the caller's `model` (waiting on the CPU)
    and move it back to `device` (a collective: every rank gathers every weight)."""
    model.load_state_dict(full_model_state(sharded))
    model.to(device)


def _param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state in torch's plain form (parameters numbered in group order), whole: the
    same file whatever the world size, so a run resumes on another number of processes. A
    collective under FSDP2."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
    if not is_main():
        return {}
    index = {n: i for i, n in enumerate(_param_names(module, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a plain optimizer state (from `optimizer_state`, any world size) into `optimizer`."""
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(module, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def no_sync(module: torch.nn.Module, sync: bool):
    """A context in which backward accumulates locally (sync False) or reduces across ranks."""
    if is_sharded(module):
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()

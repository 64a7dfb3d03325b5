"""Training rewritten models on torch.distributed: DDP as it is, FSDP2 per block, adapters saved and swapped.

- DDP: `DistributedDataParallel(gm)` works as it is; only LoRA parameters require grad, so only they are reduced.
- FSDP2: `lora_fx.shard(gm)` calls `fully_shard` on each block (see `lora_fx.blocks`) and then on the root, so each
  rank holds about 1/N of every weight at rest — the frozen base's included — and gathers one block at a time.
- Adapters: parameters must exist before `fully_shard`, so adapters are applied or loaded first; a sharded model
  takes new weights by `hotswap_adapter` into an existing slot (each rank places its shard). `save_adapter` on a
  sharded model is collective: every rank gathers the LoRA tensors, rank 0 writes the same PEFT directory a single
  process writes, and a failure on rank 0 is raised on every rank (no hang, no partial files). On an unsharded
  model in a distributed run (DDP), rank 0 writes and other ranks may not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import fx

from lora_fx.errors import AdapterError
from lora_fx.state import state_of


def shard(gm: fx.GraphModule, *, mesh=None, mp_policy=None, reshard_after_forward: bool = True) -> fx.GraphModule:
    """FSDP2 `fully_shard` on each of `gm`'s blocks, then on `gm` itself (see the module docstring); returns `gm`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    state_of(gm)
    if not (dist.is_available() and dist.is_initialized()):
        raise AdapterError("lora_fx.shard needs torch.distributed: call torch.distributed.init_process_group() first "
                           "(torchrun sets up the environment for it)")
    if is_sharded(gm):
        raise AdapterError("this graph module is already sharded")
    mode = gm.training
    gm.train(not mode).train(mode)          # both modes captured now: a sharded model cannot be captured again
    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
               "reshard_after_forward": reshard_after_forward}
    for block in gm.blocks():
        fully_shard(block, **options)
    fully_shard(gm, **options)
    return gm


def is_sharded(gm: fx.GraphModule) -> bool:
    """Whether `gm`'s parameters are FSDP2 shards (DTensors)."""
    return any(_is_dtensor(param) for param in gm.parameters())


def refuse_if_sharded(gm: fx.GraphModule, operation: str, instead: str) -> None:
    if is_sharded(gm):
        raise AdapterError(f"{operation} cannot change a sharded model: {instead}")


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard gathered (collective: every rank must call), anything else as it is."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def shard_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (the whole tensor, the same on every rank) laid out as `param` is: this rank's shard of it."""
    if not _is_dtensor(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


def require_process_group(gm: fx.GraphModule, operation: str) -> None:
    """A sharded model's collective operations need the process group its shards live on."""
    if is_sharded(gm) and not (dist.is_available() and dist.is_initialized()):
        raise AdapterError(f"{operation} on a sharded model gathers or places shards across ranks, but "
                           f"torch.distributed is not initialized (destroy_process_group was called, or it never "
                           f"ran in this process): call it while the process group that sharded the model exists")


def all_ranks_or_none(work, sharded: bool):
    """`work()` on every rank of a sharded model (a collective: every rank calls it); if it raises on any rank,
    every rank raises, naming the ranks and their errors, so that no rank goes on to change what the others do not.
    On an unsharded model (or outside torch.distributed): just `work()`, which a rank may call alone."""
    if not (sharded and dist.is_available() and dist.is_initialized()):
        return work()
    result, failure = None, None
    try:
        result = work()
    except Exception as err:   # noqa: BLE001  (shared with every rank, then raised)
        failure = f"{type(err).__name__}: {err}"
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failed = [f"rank {rank}: {text}" for rank, text in enumerate(failures) if text is not None]
    if failed:
        raise AdapterError("failed on " + "; ".join(failed) + " (no rank changed anything)")
    return result


def writer(sharded: bool) -> bool:
    """Whether this process writes files: always outside torch.distributed, else rank 0 only. On an unsharded
    model a non-writer rank calling a save is a mistake (files written by every rank race): it is refused."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    if dist.get_rank() == 0:
        return True
    if not sharded:
        raise AdapterError(f"rank {dist.get_rank()} cannot save: on an unsharded model in a distributed run, rank 0 "
                           f"writes the adapter (call save_adapter there, e.g. `if dist.get_rank() == 0:`); on a "
                           f"model sharded by FSDP2 every rank calls it")
    return False


def agree(write) -> None:
    """Run `write()` on the writer rank of a sharded save and raise its exception on every rank, so no rank waits for
    a rank that failed."""
    if not (dist.is_available() and dist.is_initialized()):
        write()
        return
    failure = [None]
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as err:   # noqa: BLE001  (sent to every rank, then raised)
            failure = [f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise AdapterError(f"saving failed on rank 0: {failure[0]}")


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)

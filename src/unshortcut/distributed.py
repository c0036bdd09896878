"""Data-parallel training with torch.distributed: ranks, sharding, gathering, one writer.

Launched with ``torchrun --nproc_per_node N $(which unshortcut) train ...`` (or across
nodes with torchrun's rendezvous options); every rank runs the same command. The pieces:

- **Batches**: every rank draws the same index arrays (they depend only on the seed and
  epoch) and keeps its strided share ``index[rank::world]``, so the ranks together hold
  exactly the single-process batch, with its group proportions. Losses are reduced as
  the global batch mean (:func:`global_mean`), so averaging gradients over ranks gives
  the gradient of the single-process loss even when shares differ in size by one row.
- **Gradients**: the model is wrapped in :class:`DistributedDataParallel` (gradients
  averaged during backward); a method's own extra modules (LfF's twin, critics) have
  their gradients averaged with one ``all_reduce`` after backward
  (:func:`average_gradients`).
- **Inference**: each rank scores a contiguous share of the rows and the shares are
  gathered in rank order, so every rank holds every prediction (selection agrees).
- **Method state** that depends on the batch (GroupDRO's group losses, LfF's loss
  averages) is summed or gathered over ranks before it is updated, so it agrees.
- **One writer**: only rank 0 writes the run folder; the others wait at barriers.

Outside torchrun (no ``WORLD_SIZE``) every function is the single-process identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unshortcut.errors import UnshortcutError


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> int:
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns the device
    this rank uses (its own GPU: ``LOCAL_RANK``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return device
    if not torch.distributed.is_available():
        raise UnshortcutError("torchrun: this torch build has no torch.distributed")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def shard(index: np.ndarray) -> np.ndarray:
    """This rank's strided share of a batch's rows (all of them in one process)."""
    return index[rank() :: world()]


def positions(n: int) -> np.ndarray:
    """Positions within a batch of ``n`` rows that :func:`shard` keeps."""
    return np.arange(rank(), n, world())


def share_length(n: int) -> int:
    """How many of the first ``n`` rows of a batch this rank holds."""
    return len(range(rank(), n, world()))


def contiguous_share(n: int) -> slice:
    """This rank's contiguous block of ``n`` rows for inference (blocks in rank order)."""
    bounds = np.linspace(0, n, world() + 1).round().astype(int)
    return slice(int(bounds[rank()]), int(bounds[rank() + 1]))


def gather_rows(block: np.ndarray | None) -> np.ndarray:
    """Concatenate every rank's block in rank order (the inverse of contiguous shares);
    ``None`` stands for a rank with no rows."""
    blocks = [b for b in gather_objects(block) if b is not None]
    return np.concatenate(blocks)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order."""
    if not active():
        return [value]
    values: list[Any] = [None] * world()
    torch.distributed.all_gather_object(values, value)
    return values


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (returned for convenience)."""
    if active():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def global_count(n: int, device: torch.device) -> int:
    """Rows of the global batch, from each rank's count."""
    return int(all_reduce_sum(torch.tensor([n], device=device)).item())


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The per-rank term whose average over ranks is the mean over the global batch.

    ``sum(values) * world / N_global``: with gradients averaged over ranks, the step is
    exactly the single-process step on the global batch. In one process: the mean.
    """
    if not active():
        return values.mean()
    n = global_count(values.numel(), values.device)
    return values.sum() * (world() / max(n, 1))


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks (one flattened all_reduce)."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat).div_(world())
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class DataParallel(DistributedDataParallel):
    """DDP whose ``outputs(x)`` goes through DDP's forward (so gradients synchronise)."""

    def outputs(self, x: torch.Tensor) -> Any:
        return self(x, outputs=True)


_DDP_PARAMS: set[int] = set()
"""ids of parameters whose gradients a DDP wrapper averages (the others: after backward)."""


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model as the training step sees it: DDP-wrapped when several ranks train
    (BatchNorm layers converted in place to SyncBatchNorm on GPUs), else the model.

    Running statistics are broadcast from rank 0 at each forward (DDP's default), so all
    ranks evaluate with the same ones.
    """
    if not active():
        return model
    if device.type == "cuda":
        for name, child in list(model.named_children()):
            model.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    ids = [device.index] if device.type == "cuda" else None
    wrapped = DataParallel(model, device_ids=ids)
    _DDP_PARAMS.update(id(p) for p in model.parameters())
    return wrapped


def average_unmanaged_gradients(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Average the gradients DDP does not handle (a method's extra modules) over ranks."""
    if not active():
        return
    params = [
        p
        for optimizer in optimizers
        for group in optimizer.param_groups
        for p in group["params"]
        if id(p) not in _DDP_PARAMS
    ]
    average_gradients(params)

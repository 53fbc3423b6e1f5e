"""Calibration passes spread over processes with torch.distributed, launched by torchrun.

``torchrun --nproc-per-node N $(which bitalloc) scores ...`` starts N copies of the command with
RANK / WORLD_SIZE / LOCAL_RANK set; :func:`init_from_env` joins them in one process group (NCCL
when the pass runs on CUDA, each rank on GPU ``LOCAL_RANK``; gloo on CPU). The pass then shards
calibration *sequences* across ranks (rank r takes sequences r, r + N, ...; strided, so the first
sequences that the measured sample of ``combined`` uses are spread too), adds up what is a sum over
sequences (H, token counts, gradient statistics, losses) with all-reduce, and splits the per-unit
score families between ranks (unit k on rank k mod N), gathering their answers everywhere. Rank 0
alone writes files and shows progress. Sums taken in another order differ in the last bits, so a
table matches the single-process one to about 1e-7 relative, not bit for bit (H is summed in fp64 and comes out
the same; BAQ's GPTQ decisions still flip with last-bit differences elsewhere, about 1e-4 at most).

Failure handling is torchrun's: a rank that raises prints its one-line error and exits non-zero,
and torchrun then stops the others. Nothing here starts or watches processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import BitallocError


@dataclass(frozen=True)
class Group:
    """This process's place in the run: ``world`` processes, this one ``rank``; (1, 0) when alone.

    ``active``: a process group was joined (torchrun, even with one process, so that a one-GPU
    launch runs the collectives too); otherwise every collective is a no-op.
    """

    world: int = 1
    rank: int = 0
    active: bool = False

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that writes outputs and shows progress."""
        return self.rank == 0

    def shard(self, n: int) -> torch.Tensor:
        """Global indices of this rank's items out of ``n`` (strided)."""
        return torch.arange(self.rank, n, self.world)

    def owns(self, k: int) -> bool:
        """Whether item ``k`` of a list split between ranks (round robin) is computed here."""
        return k % self.world == self.rank

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of ``t`` over all ranks (every rank gets the same result)."""
        if self.active:
            dist.all_reduce(t)
        return t

    def sum_float(self, *values: float) -> list[float]:
        """Sums over ranks of a few Python numbers (float64 on the wire)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


_GROUP = Group()


def current() -> Group:
    """The group this process belongs to (a single process unless :func:`init_from_env` joined one)."""
    return _GROUP


def launched() -> bool:
    """Whether torchrun (or another torch.distributed launcher) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str) -> tuple[Group, str]:
    """Join the process group torchrun describes; returns it and the device this rank computes on.

    ``device`` is the user's choice ('auto', 'cpu', 'cuda', ...): CUDA ranks take GPU LOCAL_RANK and
    NCCL, CPU ranks gloo. Without torchrun's variables this is a no-op returning (Group(), device).
    """
    global _GROUP
    if not launched():
        return _GROUP, device
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local >= torch.cuda.device_count():
            raise BitallocError(f"rank {rank} needs GPU {local}, but this machine has {torch.cuda.device_count()}; "
                                "launch at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", world_size=world, rank=rank)
    _GROUP = Group(world=world, rank=rank, active=True)
    return _GROUP, device


def _comm_device() -> torch.device:
    """Where small tensors for a collective must live: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

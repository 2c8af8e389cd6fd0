"""Data-parallel calibration with ``torch.distributed``: the processes of one run and what they share.

Under ``torchrun`` (one node or many; ``accelerate launch --multi_gpu`` drives it on GPUs) every process, a *rank*,
runs the same pipeline on its own share of the calibration windows. A layer's statistics are float64
sums over tokens, so each rank sums over its windows and the ranks all-reduce (SUM) the partial sums:
every rank then holds the statistics of all windows and solves the layer identically. Where a layer's
statistics do not depend on the compressed layers before it (``sequential=False``, e.g. ``method="paper"``)
the layers are solved in parallel instead (:class:`LayerOwners`): layer ``l`` is reduced to and solved
by rank ``l % world_size`` alone, which sends the solved layer to the ranks that keep it. Only rank 0
writes the checkpoint. A rank that fails tells the others at their next synchronisation (a one-element
all-reduce before each statistics reduction), so that every rank stops with an error instead of
waiting for it; collectives also time out (``A3_DIST_TIMEOUT_S``, default 1800 s).

One process (no process group, no ``WORLD_SIZE``) is the single-process library, unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import A3Error

TIMEOUT_ENV = "A3_DIST_TIMEOUT_S"


class DistributedRunError(A3Error, RuntimeError):
    """Another rank of a distributed run failed (its own error is in its output), or the run cannot start."""


class Ranks:
    """The processes of a run: this one's ``rank`` among ``world_size``; a single process by default."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, prints results and shows progress."""
        return self.rank == 0

    def share(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's calibration windows: a contiguous block, the first ``n % world`` ranks one more."""
        n = windows.shape[0]
        if n < self.world_size:
            raise DistributedRunError(f"{n} calibration windows cannot be shared by {self.world_size} processes: "
                                      f"use nsamples >= {self.world_size}")
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return windows[start:start + base + (self.rank < extra)]

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks, in place (after a check that no rank has failed)."""
        if not self.distributed:
            return
        self.check_ok()
        for tensor in tensors:
            self._in_place(tensor, lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM))

    def reduce_(self, tensors: list[torch.Tensor], owner: int) -> None:
        """Sum ``tensors`` over the ranks into rank ``owner``'s, in place (after a check that no rank has
        failed); the other ranks' tensors are left undefined."""
        if not self.distributed:
            return
        self.check_ok()
        for tensor in tensors:
            self._in_place(tensor, lambda t: torch.distributed.reduce(t, dst=owner, op=torch.distributed.ReduceOp.SUM))

    def _in_place(self, tensor: torch.Tensor, collective) -> None:
        """Run ``collective`` on ``tensor`` where the backend takes it (NCCL: this rank's GPU; gloo: the CPU),
        through a copy when it lives elsewhere (e.g. a CPU count under NCCL)."""
        device = self.collective_device()
        if tensor.device == device:
            collective(tensor)
            return
        moved = tensor.to(device)
        collective(moved)
        tensor.copy_(moved)

    def check_ok(self) -> None:
        """A synchronisation point: raises :class:`DistributedRunError` if any rank reports a failure."""
        failed = self._failed_rank(None) if self.distributed else None
        if failed is not None:
            raise DistributedRunError(f"rank {self.rank}: rank {failed} of this {self.world_size}-process run failed "
                                      "(its error is in its output); stopping")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run a rank's share of the work; on a failure, tell the other ranks (at their next synchronisation)
        before raising, so that none of them waits for this one; their error names this rank."""
        try:
            yield
        except DistributedRunError:
            raise
        except BaseException:
            if self.distributed:
                with contextlib.suppress(Exception):  # the group may be broken already
                    self._failed_rank(self.rank)
            raise

    def _failed_rank(self, failed: int | None) -> int | None:
        """Exchange the one-element flag: ``failed`` is this rank when it failed, else ``None``; returns a
        failed rank (the highest, if several) or ``None`` when every rank is well."""
        flag = torch.tensor([0.0 if failed is None else failed + 1.0], dtype=torch.float64,
                            device=self.collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        highest = int(flag.item())
        return highest - 1 if highest > 0 else None

    def collective_device(self) -> torch.device:
        """Where the backend takes tensors: this rank's GPU under NCCL, else the CPU."""
        backend = torch.distributed.get_backend()
        return torch.device("cuda", self.local_rank) if backend == "nccl" else torch.device("cpu")


class LayerOwners:
    """Who solves which layer. By default every rank solves every layer (sequential calibration needs the
    compressed layer on every rank: its output feeds the rank's share of the next layer's statistics).

    ``split=True`` (statistics of the original model, ``sequential=False``) is layer-parallel solving: layer
    ``idx`` belongs to rank ``idx % world_size``, which alone receives the reduced statistics (a reduce
    instead of an all-reduce) and solves it, then sends the solved layer to the ranks that keep it: every
    rank when ``to_all`` (``compress`` returns the model on each), else rank 0, which writes the checkpoint.
    Rank 0 keeps writing every shard, so the files are laid out as in one process and no filesystem needs
    to be shared between machines."""

    def __init__(self, ranks: Ranks, split: bool = False, to_all: bool = False):
        self.ranks, self.split, self.to_all = ranks, split and ranks.distributed, to_all

    def owner(self, idx: int) -> int | None:
        """The rank that solves layer ``idx``; ``None`` when every rank solves it."""
        return idx % self.ranks.world_size if self.split else None

    def solves(self, idx: int) -> bool:
        return not self.split or self.owner(idx) == self.ranks.rank

    def share(self, idx: int, layer: nn.Module) -> None:
        """After layer ``idx`` is solved on its owner: send it to the ranks that keep it, which receive it into
        ``layer`` (allocated if it is still on the meta device). Called on every rank."""
        if not self.split:
            return
        ranks, owner = self.ranks, self.owner(idx)
        ranks.check_ok()  # an owner that failed while solving stops every rank here
        device = ranks.collective_device()
        if ranks.rank == owner:
            for tensor in layer.state_dict().values():
                tensor = tensor.detach().to(device).contiguous()
                if self.to_all:
                    torch.distributed.broadcast(tensor, src=owner)
                elif owner != 0:
                    torch.distributed.send(tensor, dst=0)
            return
        if not self.to_all and ranks.rank != 0:
            return
        received = {}
        for name, like in layer.state_dict().items():  # shapes and dtypes, even on the meta device
            tensor = torch.empty(like.shape, dtype=like.dtype, device=device)
            if self.to_all:
                torch.distributed.broadcast(tensor, src=owner)
            else:
                torch.distributed.recv(tensor, src=owner)
            received[name] = tensor
        if any(p.is_meta for p in layer.parameters()):
            layer.to_empty(device=device)
        layer.load_state_dict(received, strict=True)


def current_ranks(device: str | None = None) -> Ranks:
    """The ranks of this run: an initialised default process group, else one initialised from the
    ``torchrun`` environment (``WORLD_SIZE`` > 1; NCCL for ``device="cuda"``, else gloo), else one process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return Ranks()
    if not dist.is_available():
        raise DistributedRunError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "gloo"
    if device is not None and str(device).startswith("cuda"):
        backend = "nccl"
        torch.cuda.set_device(local_rank)  # "cuda" then means this rank's GPU
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)

"""One tensor-parallel rank's view of its group, and the near-even partitions that shard a model over it.

The group is a plain object passed to whoever needs it (the model's parallel layers, the engine's step messages):
no ``torch.distributed.init_process_group`` and so no process-global default group. Collectives call the
``ProcessGroup`` object directly (gloo on CPU, NCCL on CUDA, where they are CUDA-graph capturable); each has a
timeout, so a rank that dies or hangs makes the others fail instead of waiting forever.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0
"""How long one collective waits for a peer: generous, because a dead peer closes its connections and fails the
collective at once; only a rank that is alive but stuck takes this long to notice."""


def partition(total: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each of ``parts`` contiguous near-even pieces of ``range(total)``; earlier pieces get
    the remainder (``partition(3, 2) == [(0, 2), (2, 3)]``)."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for index in range(parts):
        end = start + base + (index < extra)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's rank among ``world_size`` ranks that each hold one shard of the model.

    Invariant: every rank calls the same collectives in the same order (rank 0 tells the others what to run).
    """

    rank: int
    world_size: int
    process_group: dist.ProcessGroup

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        self.process_group.allreduce([tensor]).wait()
        return tensor

    def all_reduce_min(self, value: int) -> int:
        """The smallest of the ranks' ``value`` (startup only: the host waits for it)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.process_group.allreduce([tensor], options).wait()
        return int(tensor.item())

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` into every rank's ``tensor`` (same shape and dtype everywhere), in place."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.process_group.broadcast([tensor], options).wait()
        return tensor

    def gather_columns(self, local: torch.Tensor, widths: list[int]) -> torch.Tensor | None:
        """Rank 0: the ranks' ``[N, widths[r]]`` pieces side by side, ``[N, sum(widths)]``; other ranks: None.

        Pieces are padded to the widest one on the wire (gather needs one shape)."""
        widest = max(widths)
        if local.shape[-1] < widest:
            local = torch.nn.functional.pad(local, (0, widest - local.shape[-1]))
        local = local.contiguous()
        options = dist.GatherOptions()
        options.rootRank = 0
        received = [[torch.empty_like(local) for _ in range(self.world_size)]] if self.is_first else []
        self.process_group.gather(received, [local], options).wait()
        if not self.is_first:
            return None
        return torch.cat([piece[..., :width] for piece, width in zip(received[0], widths, strict=True)], dim=-1)

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        """``tensor``'s bytes to rank ``dst`` (point to point; ``dst`` posts the matching ``recv``). Travels as
        bytes, so any dtype goes (gloo has no float8)."""
        self.process_group.send([_as_bytes(tensor)], dst, tag).wait()

    def recv(self, tensor: torch.Tensor, src: int, tag: int) -> torch.Tensor:
        """Rank ``src``'s ``send`` into ``tensor`` (contiguous, same shape and dtype as sent), in place."""
        self.process_group.recv([_as_bytes(tensor)], src, tag).wait()
        return tensor

    def _collective_device(self) -> torch.device:
        backend = self.process_group.name() if hasattr(self.process_group, "name") else "gloo"
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError("point-to-point tensors must be contiguous")
    return tensor.reshape(-1).view(torch.uint8)


def create_group(
    rank: int,
    world_size: int,
    store_port: int,
    device: torch.device,
    store: dist.Store | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TensorParallelGroup:
    """Join the group whose TCP store listens on 127.0.0.1:``store_port`` (rank 0 passes the store it made).

    NCCL on CUDA (the caller has set this rank's device), gloo otherwise. Blocks until every rank has joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", store_port, world_size, False, timeout=timeout)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        process_group = dist.ProcessGroupNCCL(store, rank, world_size, options)
    else:
        process_group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    return TensorParallelGroup(rank, world_size, process_group)


def create_store(world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free 127.0.0.1 port (``store.port``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore("127.0.0.1", 0, world_size, True, timeout=timeout, wait_for_workers=False)

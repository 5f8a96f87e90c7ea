"""Tensor-parallel pieces of a Llama-family model: which heads, rows and vocabulary each rank holds, and the
layers whose output needs the other ranks' (row-parallel linears, the vocab-parallel embedding and LM head).

Column-parallel projections (fused qkv, fused gate/up) are plain ``nn.Linear`` layers of the rank's rows: their
output stays sharded until the row-parallel projection after them sums the ranks' partial products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from common.distributed.group import TensorParallelGroup, partition


@dataclass(frozen=True)
class HeadShard:
    """The query heads ``[q_start, q_end)`` and KV heads ``[kv_start, kv_end)`` one rank attends with.

    Each KV head's group of query heads stays on the rank(s) holding that KV head."""

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int

    @property
    def num_heads(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_end - self.kv_start


def shard_heads(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    """Contiguous near-even KV-head groups per rank (9 q / 3 kv heads over 2 ranks: 6 q + 2 kv, then 3 q + 1 kv).

    With more ranks than KV heads each KV head is replicated on ``world_size // num_kv_heads`` ranks that split its
    query heads; ``world_size`` must then be a multiple of ``num_kv_heads``. ValueError when a rank would get no
    query head."""
    group = num_heads // num_kv_heads
    if world_size <= num_kv_heads:
        kv_start, kv_end = partition(num_kv_heads, world_size)[rank]
        return HeadShard(kv_start * group, kv_end * group, kv_start, kv_end)
    if world_size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size {world_size} exceeds the model's {num_kv_heads} KV heads and is not a multiple "
            f"of it (KV heads are replicated evenly when ranks outnumber them)"
        )
    replicas = world_size // num_kv_heads
    if group < replicas:
        raise ValueError(f"tensor_parallel_size {world_size} exceeds the model's {num_heads} attention heads")
    kv_head = rank // replicas
    q_start, q_end = partition(group, replicas)[rank % replicas]
    return HeadShard(kv_head * group + q_start, kv_head * group + q_end, kv_head, kv_head + 1)


class RowParallelLinear(nn.Linear):
    """``x_shard @ W[:, shard].T`` summed over the ranks, then the (unsharded) bias once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(functional.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[vocab_start, vocab_end)`` of the embedding; other ids give zeros here, and the sum over the ranks
    gives every id its row."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallelGroup) -> None:
        self.widths = [end - start for start, end in partition(vocab_size, tp.world_size)]
        self.vocab_start, self.vocab_end = partition(vocab_size, tp.world_size)[tp.rank]
        super().__init__(self.vocab_end - self.vocab_start, hidden)
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(outside, 0)
        embedded = super().forward(local).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(embedded)


class VocabParallelLMHead(nn.Linear):
    """Logits of the rank's vocabulary rows, gathered into the full vocabulary on rank 0 (other ranks get their
    own columns only; they never sample)."""

    def __init__(self, hidden: int, vocab_size: int, tp: TensorParallelGroup) -> None:
        self.widths = [end - start for start, end in partition(vocab_size, tp.world_size)]
        super().__init__(hidden, self.widths[tp.rank], bias=False)
        self.tp = tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = functional.linear(hidden, self.weight).float()
        gathered = self.tp.gather_columns(local, self.widths)
        return local if gathered is None else gathered

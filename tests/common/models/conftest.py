"""A tiny paged "model runner" for tests: random block tables, NaN-poisoned cache, mixed batches."""

from __future__ import annotations

import pytest
import torch

from kernels.attention_metadata import AttentionMetadata


class PagedRunner:
    """Feeds token chunks of several sequences through a model, step by step, via the paged cache.

    Each sequence owns shuffled, non-contiguous blocks; unused cache memory is NaN so reading a
    slot that was never written poisons the logits.
    """

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.model, self.block_size = model, block_size
        p = next(model.parameters())
        shape = (model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv_cache = torch.full(shape, float("nan"), dtype=p.dtype, device=p.device)
        gen = torch.Generator().manual_seed(seed)
        self.free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0: table padding
        self.blocks: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def _slot(self, seq: str, pos: int) -> int:
        blocks = self.blocks.setdefault(seq, [])
        while len(blocks) <= pos // self.block_size:
            blocks.append(self.free.pop())
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def step(self, chunks: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """Run one batch of (sequence, next tokens) chunks; returns each chunk's logits [n, vocab]."""
        ids, positions, slots, q_lens, s_lens = [], [], [], [], []
        for seq, tokens in chunks:
            start = self.computed.get(seq, 0)
            ids += tokens
            positions += range(start, start + len(tokens))
            slots += [self._slot(seq, p) for p in range(start, start + len(tokens))]
            q_lens.append(len(tokens))
            s_lens.append(start + len(tokens))
            self.computed[seq] = start + len(tokens)
        metadata = self._metadata([seq for seq, _ in chunks], slots, q_lens, s_lens)
        device = self.kv_cache.device
        with torch.no_grad():
            hidden = self.model(
                torch.tensor(ids, device=device),
                torch.tensor(positions, device=device),
                self.kv_cache,
                metadata,
            )
            logits = self.model.compute_logits(hidden)
        return list(logits.split(q_lens))

    def _metadata(self, seqs: list[str], slots: list[int], q_lens: list[int], s_lens: list[int]):
        width = max(len(self.blocks[s]) for s in seqs)
        table = torch.zeros(len(seqs), width, dtype=torch.int32)
        for i, s in enumerate(seqs):
            table[i, : len(self.blocks[s])] = torch.tensor(self.blocks[s], dtype=torch.int32)
        device = self.kv_cache.device
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=starts.to(device),
            seq_lens=torch.tensor(s_lens, dtype=torch.int32, device=device),
            block_tables=table.to(device),
            query_lens_cpu=tuple(q_lens),
            seq_lens_cpu=tuple(s_lens),
            block_size=self.block_size,
        )


@pytest.fixture
def paged_runner():
    """The ``PagedRunner`` class (a fixture, so test modules need not import conftest)."""
    return PagedRunner

"""Draft-model speculation: a small model sharing the target's tokenizer proposes k tokens per sequence.

As in vLLM, the draft keeps its own paged KV cache with the target's block count and block size and writes it
through the target's block tables, so it needs no block allocator: a slot the target owns for a position holds
the draft's K/V of that same position. ``propose`` first catches each sequence up (one varlen forward over the
tokens whose draft KV is missing or stale), then runs k-1 single-token forwards, each feeding the previous
draft token. Everything stays on the device: ``propose`` never waits for it (eager; no CUDA graphs yet).

Which draft KV is still valid is the proposer's own business: per request it remembers how many host tokens it
wrote, the draft tokens it wrote after them, and the block table it wrote through. At the next ``propose`` the
accepted drafts (those matching the new tokens) are kept and everything from the first rejected one, or from
the first block whose id changed (a copy-on-write), is recomputed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from common.engine.device_copy import record_event, to_device, to_host_async
from common.engine.kv_cache_sizing import bytes_per_block
from common.engine.sampling_params import GREEDY_TEMPERATURE_EPS
from common.models.loader import load_model, resolve_model_path
from kernels.attention_metadata import AttentionMetadata

if TYPE_CHECKING:
    from common.speculative_config import SpeculativeConfig


@dataclass(frozen=True)
class DraftSequence:
    """One sequence to propose for.

    ``token_ids``: every token the host has (prompt + outputs); the last one has no target KV yet. Only its
    length and its newest tokens are read, so a request's append-only token list can be passed as it is.
    ``block_ids``: the target's block table for this request, covering at least positions
    ``0 .. len(token_ids) + k - 2`` (the draft writes its own tokens' KV there). Invariant: the tokens a
    request had at its previous ``propose`` never change until ``forget`` (host tokens are append-only).
    """

    request_id: str
    token_ids: np.ndarray | Sequence[int]
    block_ids: tuple[int, ...]
    temperature: float  # below GREEDY_TEMPERATURE_EPS: greedy


@dataclass
class DraftProposal:
    """``token_ids[i, j]``: draft token j of sequence i, drawn from ``probs[i, j]`` (over the target's
    vocabulary; one-hot for a greedy row). ``probs`` is None when every row is greedy."""

    token_ids: torch.Tensor  # [N, k] int64 on the device
    probs: torch.Tensor | None  # [N, k, V] float32 on the device


@dataclass(frozen=True)
class DraftModel:
    """A loaded draft model whose cache is not allocated yet (the engine sizes both caches first).

    Invariant: its vocabulary covers every target token id (``target_vocab_size <= hf_config.vocab_size``).
    """

    path: Path
    hf_config: PretrainedConfig
    model: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    target_vocab_size: int

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one block of the draft's cache takes: what each target block costs on top of its own KV."""
        return bytes_per_block(self.model, block_size, self.dtype)


def load_draft_model(
    spec: SpeculativeConfig,
    target_hf_config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    download_dir: str | None,
) -> DraftModel:
    """Load ``spec.model`` (same dtype, device and load format as the target).

    Raises ValueError naming ``speculative_config.model`` when it cannot be found or its vocabulary does not
    cover the target's token ids (the draft must share the target's tokenizer; a larger, padded embedding is
    fine: its extra ids are never proposed).
    """
    try:
        path = resolve_model_path(spec.model, download_dir)
    except ValueError as error:
        raise ValueError(f"speculative_config.model: {error}") from error
    hf_config: PretrainedConfig = AutoConfig.from_pretrained(path)
    target_vocab = int(target_hf_config.vocab_size)
    if int(hf_config.vocab_size) < target_vocab:
        raise ValueError(
            f"speculative_config.model={spec.model!r}: its vocabulary has {hf_config.vocab_size} tokens, fewer "
            f"than the target's {target_vocab}; a draft model must share the target's tokenizer"
        )
    model = load_model(path, hf_config, dtype, device, load_format)
    return DraftModel(path, hf_config, model, dtype, device, target_vocab)


@dataclass(frozen=True)
class _WrittenKV:
    """What one request's draft KV holds: its first ``num_host_tokens`` tokens, then draft row ``row`` of
    ``drafts`` at the following positions, all written through ``block_ids``."""

    num_host_tokens: int
    drafts: _DraftsOnHost | None
    row: int
    block_ids: np.ndarray


class _DraftsOnHost:
    """Draft tokens on their way to the host; read only once the copy's event has completed."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self._host = to_host_async([tokens.contiguous()])[0] if tokens.is_cuda else tokens.clone()
        self._copied = record_event(tokens.device)

    def row(self, index: int) -> np.ndarray:
        if self._copied is not None:
            self._copied.synchronize()  # long done by now: the target verified these drafts since
        return self._host[index].numpy()


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading elements ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def catch_up_chunks(starts: Sequence[int], ends: Sequence[int], budget: int) -> Iterator[list[tuple[int, int, int]]]:
    """Split each row's span [start, end) into forwards of at most ``budget`` tokens, rows in order: each chunk
    is a list of (row, start, end) over consecutive rows, each row at most once, and a row's spans follow one
    another across chunks."""
    chunk: list[tuple[int, int, int]] = []
    room = budget
    for row, (start, end) in enumerate(zip(starts, ends, strict=True)):
        while start < end:
            take = min(end - start, room)
            chunk.append((row, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                yield chunk
                chunk, room = [], budget
    if chunk:
        yield chunk


class DraftModelProposer:
    """Proposes k draft tokens per sequence with a draft model whose paged KV cache mirrors the target's blocks.

    Invariants: ``kv_cache`` is ``[draft_layers, 2, num_blocks, block_size, draft_kv_heads, draft_head_dim]``
    and is addressed only through the block tables callers pass (the target's, so block ids mean the same
    thing in both caches); a request's draft KV is reused only for the prefix whose tokens and blocks are
    unchanged since it was written. A finished or preempted request must be ``forget``-ed before its blocks
    (or its request id) are reused.
    """

    def __init__(
        self,
        draft: DraftModel,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        generator: torch.Generator,
        max_num_batched_tokens: int = 2048,
    ) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {max_num_batched_tokens}")
        limit = int(getattr(draft.hf_config, "max_position_embeddings", max_model_len))
        if limit < max_model_len:
            raise ValueError(
                f"speculative_config.model={str(draft.path)!r}: the draft handles {limit} positions, fewer than "
                f"max_model_len {max_model_len}; lower max_model_len or pick another draft model"
            )
        self.draft = draft
        self.model = draft.model
        self.block_size = block_size
        self.device = draft.device
        self.generator = generator
        self.max_num_batched_tokens = max_num_batched_tokens  # a catch-up forward's tokens (activation memory)
        shape = (self.model.num_layers, 2, num_blocks, block_size, self.model.num_kv_heads, self.model.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=draft.dtype, device=draft.device)
        self._written: dict[str, _WrittenKV] = {}

    def forget(self, request_id: str) -> None:
        """The request finished or was preempted: its draft KV is gone (its blocks may be handed out again)."""
        self._written.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, sequences: Sequence[DraftSequence], k: int) -> DraftProposal:
        """k draft tokens per sequence, in the order given; enqueues device work without waiting for it."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not sequences:
            return DraftProposal(torch.empty((0, k), dtype=torch.long, device=self.device), None)
        tables = [self._block_table(seq, k) for seq in sequences]
        device_tables = self._padded_tables(tables)
        choose = _TokenChooser([seq.temperature for seq in sequences], self.draft.target_vocab_size, self.generator)
        tokens, probs = choose(self._catch_up(sequences, tables, device_tables))
        all_tokens, all_probs = [tokens], [probs]
        lengths = np.asarray([len(seq.token_ids) for seq in sequences], dtype=np.int64)
        for step in range(1, k):
            tokens, probs = choose(self._extend(tokens, lengths + step - 1, tables, device_tables))
            all_tokens.append(tokens)
            all_probs.append(probs)
        token_ids = torch.stack(all_tokens, dim=1)
        self._remember(sequences, tables, token_ids[:, : k - 1])
        return DraftProposal(token_ids, None if probs is None else torch.stack(all_probs, dim=1))

    def _block_table(self, seq: DraftSequence, k: int) -> np.ndarray:
        table = np.asarray(seq.block_ids, dtype=np.int64)
        needed = len(seq.token_ids) + k - 1
        if len(seq.token_ids) < 1 or len(table) * self.block_size < needed:
            raise ValueError(
                f"request {seq.request_id}: {len(seq.token_ids)} tokens and {len(table)} blocks; proposing "
                f"{k} tokens needs at least one token and blocks for {needed} positions"
            )
        return table

    def _padded_tables(self, tables: list[np.ndarray]) -> torch.Tensor:
        padded = np.zeros((len(tables), max(len(table) for table in tables)), dtype=np.int32)
        for row, table in enumerate(tables):
            padded[row, : len(table)] = table
        return to_device(padded, self.device)

    def _reusable_length(self, seq: DraftSequence, table: np.ndarray) -> int:
        """Leading positions whose draft KV is still valid; never the last token, whose logits are needed."""
        written = self._written.get(seq.request_id)
        if written is None or len(seq.token_ids) < written.num_host_tokens:
            return 0
        valid = written.num_host_tokens
        if written.drafts is not None:
            drafts = written.drafts.row(written.row)
            valid += common_prefix_length(drafts, np.asarray(seq.token_ids[valid : valid + len(drafts)]))
        same_blocks = common_prefix_length(written.block_ids, table)
        return min(valid, same_blocks * self.block_size, len(seq.token_ids) - 1)

    def _catch_up(
        self, sequences: Sequence[DraftSequence], tables: list[np.ndarray], device_tables: torch.Tensor
    ) -> torch.Tensor:
        """Varlen forwards over each sequence's tokens without valid draft KV (usually one; more when they hold
        over ``max_num_batched_tokens`` tokens); the logits of each sequence's last token, in order."""
        starts = [self._reusable_length(seq, table) for seq, table in zip(sequences, tables, strict=True)]
        ends = [len(seq.token_ids) for seq in sequences]
        last_hidden = []
        for spans in catch_up_chunks(starts, ends, self.max_num_batched_tokens):
            first, last = spans[0][0], spans[-1][0]  # a chunk holds consecutive rows, each once
            hidden = self._forward_spans(sequences, tables, device_tables[first : last + 1], spans)
            row_ends = np.cumsum([end - start for _, start, end in spans], dtype=np.int64) - 1
            done = [i for i, (row, _, end) in enumerate(spans) if end == ends[row]]
            last_hidden.append(hidden[to_device(row_ends[done], self.device)])
        return self.model.compute_logits(torch.cat(last_hidden) if len(last_hidden) > 1 else last_hidden[0])

    def _forward_spans(
        self,
        sequences: Sequence[DraftSequence],
        tables: list[np.ndarray],
        device_tables: torch.Tensor,
        spans: list[tuple[int, int, int]],
    ) -> torch.Tensor:
        """One forward over positions [start, end) of each (row, start, end); hidden states of every token."""
        token_ids, positions, slots = [], [], []
        for row, start, end in spans:
            span = np.arange(start, end, dtype=np.int64)
            token_ids.append(np.asarray(sequences[row].token_ids[start:end], dtype=np.int64))
            positions.append(span)
            slots.append(tables[row][span // self.block_size] * self.block_size + span % self.block_size)
        query_lens = [end - start for _, start, end in spans]
        metadata = self._metadata(np.concatenate(slots), query_lens, [end for *_, end in spans], device_tables)
        input_ids = to_device(np.concatenate(token_ids), self.device)
        return self.model(input_ids, to_device(np.concatenate(positions), self.device), self.kv_cache, metadata)

    def _extend(
        self, tokens: torch.Tensor, positions: np.ndarray, tables: list[np.ndarray], device_tables: torch.Tensor
    ) -> torch.Tensor:
        """One token per sequence: ``tokens`` (on the device) at ``positions``; the logits after each."""
        blocks = np.asarray([table[p // self.block_size] for table, p in zip(tables, positions, strict=True)])
        slots = blocks * self.block_size + positions % self.block_size
        seq_lens = (positions + 1).tolist()
        metadata = self._metadata(slots, [1] * len(seq_lens), seq_lens, device_tables)
        hidden = self.model(tokens, to_device(positions, self.device), self.kv_cache, metadata)
        return self.model.compute_logits(hidden)

    def _metadata(
        self, slots: np.ndarray, query_lens: list[int], seq_lens: list[int], device_tables: torch.Tensor
    ) -> AttentionMetadata:
        """Built as the target's runner builds it (``ModelRunner._to_tensors``); the kernel picks decode splits."""
        query_start = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start[1:])
        return AttentionMetadata(
            slot_mapping=to_device(np.ascontiguousarray(slots, dtype=np.int64), self.device),
            query_start_loc=to_device(query_start, self.device),
            seq_lens=to_device(np.asarray(seq_lens, dtype=np.int32), self.device),
            block_tables=device_tables,
            query_lens_cpu=tuple(query_lens),
            seq_lens_cpu=tuple(seq_lens),
            block_size=self.block_size,
        )

    def _remember(self, sequences: Sequence[DraftSequence], tables: list[np.ndarray], drafts: torch.Tensor) -> None:
        """After a propose the draft KV holds each sequence's tokens, then its first k-1 draft tokens."""
        on_host = _DraftsOnHost(drafts) if drafts.shape[1] else None
        for row, (seq, table) in enumerate(zip(sequences, tables, strict=True)):
            self._written[seq.request_id] = _WrittenKV(len(seq.token_ids), on_host, row, table)


class _TokenChooser:
    """Greedy rows take the argmax; the others sample softmax(logits / temperature) by inverse CDF with one
    uniform per row and draft position from the shared generator (the convention of ``Sampler._sample``).

    Only the target's vocabulary is considered (a padded draft embedding's extra ids are never proposed).
    Returns the tokens and the distributions they were drawn from (one-hot for greedy rows), or None for the
    distributions when every row is greedy. No top-k/top-p: rejection sampling only needs the true draft
    distribution, whatever it is.
    """

    def __init__(self, temperatures: list[float], vocab_size: int, generator: torch.Generator) -> None:
        self.vocab_size = vocab_size
        self.generator = generator
        self.random_rows = [row for row, t in enumerate(temperatures) if t >= GREEDY_TEMPERATURE_EPS]
        self.all_random = len(self.random_rows) == len(temperatures)
        self._temperatures = np.asarray([temperatures[row] for row in self.random_rows], dtype=np.float32)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = logits[:, : self.vocab_size]
        if not self.random_rows:
            return logits.argmax(dim=-1), None
        if self.all_random:
            return self._sample(logits)
        rows = to_device(np.asarray(self.random_rows, dtype=np.int64), logits.device)
        tokens = logits.argmax(dim=-1)
        probs = torch.nn.functional.one_hot(tokens, self.vocab_size).float()
        tokens[rows], probs[rows] = self._sample(logits[rows])
        return tokens, probs

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temperatures = to_device(self._temperatures, logits.device).unsqueeze(1)
        probs = (logits.float() / temperatures).softmax(dim=-1)
        cdf = probs.cumsum(dim=-1)
        uniforms = 1.0 - torch.rand(len(self.random_rows), generator=self.generator, device=self.generator.device)
        if uniforms.device != logits.device:
            uniforms = to_device(uniforms, logits.device)
        targets = uniforms.unsqueeze(1) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, targets).squeeze(1).clamp_(max=self.vocab_size - 1)
        return tokens, probs

"""Tensor-parallel sharding of the Llama-family model: the head partition, each rank's load as the matching slice of
the full weights, and the same logits from 2 (and 4) gloo processes as from one."""

from __future__ import annotations

import multiprocessing
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from common.distributed.group import create_group, create_store
from common.models.loader import load_model
from common.models.parallel_layers import HeadShard, shard_heads
from kernels.attention_metadata import AttentionMetadata

BASE = dict(hidden_size=64, num_hidden_layers=2, max_position_embeddings=256)
CONFIGS = {
    # even: 4 q / 2 kv heads, vocab and intermediate split evenly
    "llama-4h-2kv": lambda: LlamaConfig(**BASE, vocab_size=256, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2),
    # uneven everything (SmolLM2's head layout, odd vocab and intermediate), with q/k/v biases
    "qwen2-9h-3kv-uneven": lambda: Qwen2Config(**{**BASE, "hidden_size": 72}, vocab_size=251, intermediate_size=97,
                                               num_attention_heads=9, num_key_value_heads=3,
                                               tie_word_embeddings=False),
    # tied embeddings and row-parallel biases (o_proj, down_proj)
    "llama-tied-bias": lambda: LlamaConfig(**BASE, vocab_size=255, intermediate_size=130, num_attention_heads=4,
                                           num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                                           mlp_bias=True),
}
BLOCK_SIZE = 8


def test_head_shards_follow_kv_groups_near_evenly() -> None:
    assert [shard_heads(9, 3, r, 2) for r in range(2)] == [HeadShard(0, 6, 0, 2), HeadShard(6, 9, 2, 3)]
    assert [shard_heads(4, 2, r, 2) for r in range(2)] == [HeadShard(0, 2, 0, 1), HeadShard(2, 4, 1, 2)]
    assert shard_heads(32, 8, 3, 4) == HeadShard(24, 32, 6, 8)


def test_more_ranks_than_kv_heads_replicate_each_kv_head() -> None:
    shards = [shard_heads(8, 2, r, 4) for r in range(4)]
    assert [(s.q_start, s.q_end) for s in shards] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [(s.kv_start, s.kv_end) for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [shard_heads(9, 3, r, 6).num_heads for r in range(6)] == [2, 1, 2, 1, 2, 1]


@pytest.mark.parametrize(("heads", "kv_heads", "ranks", "match"), [
    (9, 3, 4, "not a multiple"),
    (4, 2, 8, "exceeds the model's 4 attention heads"),
])
def test_impossible_head_splits_are_clear_errors(heads, kv_heads, ranks, match) -> None:
    with pytest.raises(ValueError, match=match):
        shard_heads(heads, kv_heads, 0, ranks)


@pytest.fixture(params=sorted(CONFIGS))
def checkpoint(request, tmp_path):
    """A tiny HF checkpoint with every weight (biases and norms too) random, saved to tmp_path."""
    config = CONFIGS[request.param]()
    config.architectures = [config.__class__.__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    hf.save_pretrained(tmp_path)
    return tmp_path


def _load(path, tp=None):
    return load_model(path, AutoConfig.from_pretrained(path), torch.float32, torch.device("cpu"), "auto", tp=tp)


def _expected_shard(full: dict[str, torch.Tensor], name: str, model, rank: int) -> torch.Tensor:
    """The rank's part of a full (single-process) parameter, cut by hand from the config."""
    attn, mlp, embed = model.model.layers[0].self_attn, model.model.layers[0].mlp, model.model.embed_tokens
    d, s, (i0, i1) = attn.head_dim, attn.shard, mlp.rows
    tensor = full[name]
    if ".qkv_proj." in name:
        heads = model.config.num_attention_heads * d
        kv = (tensor.shape[0] - heads) // 2
        q, k, v = tensor[:heads], tensor[heads : heads + kv], tensor[heads + kv :]
        return torch.cat([q[s.q_start * d : s.q_end * d], k[s.kv_start * d : s.kv_end * d],
                          v[s.kv_start * d : s.kv_end * d]])
    if ".gate_up_proj." in name:
        inter = tensor.shape[0] // 2
        return torch.cat([tensor[:inter][i0:i1], tensor[inter:][i0:i1]])
    if name.endswith("o_proj.weight"):
        return tensor[:, s.q_start * d : s.q_end * d]
    if name.endswith("down_proj.weight"):
        return tensor[:, i0:i1]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return tensor[embed.vocab_start : embed.vocab_end]
    return tensor


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_ranks_load_is_its_slice_of_the_full_weights(checkpoint, world_size) -> None:
    full = dict(_load(checkpoint).named_parameters())
    for rank in range(world_size):
        try:
            model = _load(checkpoint, SimpleNamespace(rank=rank, world_size=world_size))  # loading runs no collective
        except ValueError as error:  # 4 q / 2 kv heads do not split over 3 ranks
            assert "not a multiple" in str(error)
            return
        for name, param in model.named_parameters():
            expected = _expected_shard(full, name, model, rank)
            assert param.shape == expected.shape, name
            assert torch.equal(param, expected), name


# ---------------------------------------------------------------------------------------------------- logits


def _metadata(q_lens: list[int], s_lens: list[int], slots: list[int], tables: list[list[int]]) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()],
                                                                       dtype=torch.int32),
        seq_lens=torch.tensor(s_lens, dtype=torch.int32), block_tables=table, query_lens_cpu=tuple(q_lens),
        seq_lens_cpu=tuple(s_lens), block_size=BLOCK_SIZE,
    )


@torch.no_grad()
def _two_steps_logits(model) -> list[torch.Tensor | None]:
    """A prefill of two sequences (13 and 9 tokens), then a mixed step (one decode, one 5-token chunk)."""
    cache = torch.zeros(model.num_layers, 2, 8, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    a, b = torch.randint(vocab, (14,), generator=gen), torch.randint(vocab, (14,), generator=gen)
    tables = [[3, 1], [2, 5]]
    slot = lambda seq, pos: tables[seq][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE  # noqa: E731
    outputs = []
    first = _metadata([13, 9], [13, 9], [slot(0, p) for p in range(13)] + [slot(1, p) for p in range(9)], tables)
    hidden = model(torch.cat([a[:13], b[:9]]), torch.cat([torch.arange(13), torch.arange(9)]), cache, first)
    outputs.append(model.compute_logits(hidden))
    second = _metadata([1, 5], [14, 14], [slot(0, 13)] + [slot(1, p) for p in range(9, 14)], tables)
    hidden = model(torch.cat([a[13:], b[9:]]), torch.cat([torch.tensor([13]), torch.arange(9, 14)]), cache, second)
    outputs.append(model.compute_logits(hidden[[0, 5]]))
    return outputs


def _rank_main(path, rank: int, world_size: int, port: int, results) -> None:
    group = create_group(rank, world_size, port, torch.device("cpu"), timeout_s=60)
    outputs = _two_steps_logits(_load(path, group))
    results.put((rank, outputs if rank == 0 else None))


def _tensor_parallel_logits(path, world_size: int) -> list[torch.Tensor]:
    context = multiprocessing.get_context("spawn")
    store = create_store(world_size, timeout_s=60)
    results = context.Queue()
    children = [context.Process(target=_rank_main, args=(path, r, world_size, store.port, results))
                for r in range(1, world_size)]
    for child in children:
        child.start()
    try:
        group = create_group(0, world_size, store.port, torch.device("cpu"), store=store, timeout_s=60)
        outputs = _two_steps_logits(_load(path, group))
        assert sorted(results.get(timeout=60)[0] for _ in children) == list(range(1, world_size))
    finally:
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
    assert all(child.exitcode == 0 for child in children)
    return outputs


# Every config at 2 ranks; 4 ranks (KV heads replicated) on the even config only: processes are slow here.
SPLITS = [(name, 2) for name in sorted(CONFIGS)] + [("llama-4h-2kv", 4)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("checkpoint", "world_size"), SPLITS, indirect=["checkpoint"])
def test_tensor_parallel_logits_equal_one_process(checkpoint, world_size) -> None:
    reference = _two_steps_logits(_load(checkpoint))
    outputs = _tensor_parallel_logits(checkpoint, world_size)
    for got, want in zip(outputs, reference, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

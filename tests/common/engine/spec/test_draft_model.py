"""The draft-model proposer against HF transformers running the same tiny random-weight Llama (fp32).

The draft has SmolLM2's vocabulary (49152 ids) but 2 layers of width 64; its paged KV cache is written through
shuffled block tables that grow as a target's would, and the target's verification is simulated by accepting
some drafts and appending a bonus token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.config import CacheConfig, SchedulerConfig
from common.engine.kv_cache_sizing import allocate_kv_cache
from common.engine.spec.draft_model import (
    DraftModel,
    DraftModelProposer,
    DraftSequence,
    catch_up_chunks,
    common_prefix_length,
    load_draft_model,
)
from common.speculative_config import SpeculativeConfig
from tests.hf_reference import hf_greedy, load_hf_model

SMOLLM2_VOCAB = 49152
BLOCK_SIZE = 4
NUM_BLOCKS = 96
MAX_MODEL_LEN = 256
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_MODEL_LEN,
)


def write_draft(path: Path, vocab_size: int = SMOLLM2_VOCAB, **overrides) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**TINY, **overrides})).save_pretrained(path)
    return path


def load_draft(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DraftModel:
    spec = SpeculativeConfig(model=str(path), num_speculative_tokens=3)
    target = LlamaConfig(vocab_size=SMOLLM2_VOCAB)
    return load_draft_model(spec, target, dtype, torch.device(device), "auto", None)


def make_proposer(draft: DraftModel, seed: int = 0, max_num_batched_tokens: int = 2048) -> DraftModelProposer:
    generator = torch.Generator(device=draft.device).manual_seed(seed)
    return DraftModelProposer(draft, NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN, generator, max_num_batched_tokens)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> Path:
    return write_draft(tmp_path_factory.mktemp("draft"))


@pytest.fixture(scope="module")
def draft(draft_dir) -> DraftModel:
    return load_draft(draft_dir)


@pytest.fixture(scope="module")
def hf(draft_dir) -> torch.nn.Module:
    return load_hf_model(draft_dir)


class Sequences:
    """Requests with disjoint shuffled blocks; each table covers exactly the positions a propose of k writes."""

    def __init__(self, prompts: list[np.ndarray], temperatures: list[float], seed: int) -> None:
        blocks = np.random.default_rng(seed).permutation(NUM_BLOCKS)
        share = NUM_BLOCKS // len(prompts)
        self.blocks = [blocks[i * share : (i + 1) * share].tolist() for i in range(len(prompts))]
        self.tokens = [list(map(int, prompt)) for prompt in prompts]
        self.temperatures = temperatures

    def for_k(self, k: int) -> list[DraftSequence]:
        return [
            DraftSequence(
                request_id=f"r{i}",
                token_ids=np.asarray(tokens, dtype=np.int64) if i % 2 == 0 else list(tokens),  # both kinds work
                block_ids=tuple(self.blocks[i][: -(-(len(tokens) + k - 1) // BLOCK_SIZE)]),
                temperature=temperature,
            )
            for i, (tokens, temperature) in enumerate(zip(self.tokens, self.temperatures, strict=True))
        ]


def random_prompts(rng: np.random.Generator, lengths: tuple[int, ...]) -> list[np.ndarray]:
    return [rng.integers(0, SMOLLM2_VOCAB, size=length) for length in lengths]


class ForwardRecorder:
    """Wraps the draft model to record how many tokens each forward ran."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.num_tokens: list[int] = []
        self.num_layers, self.num_kv_heads, self.head_dim = model.num_layers, model.num_kv_heads, model.head_dim

    def __call__(self, input_ids, positions, kv_cache, metadata):
        self.num_tokens.append(len(input_ids))
        return self.model(input_ids, positions, kv_cache, metadata)

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)


def test_greedy_proposals_equal_hf_greedy_continuation(draft, hf):
    sequences = Sequences(random_prompts(np.random.default_rng(0), (1, 9, 23)), [0.0] * 3, seed=0)
    proposal = make_proposer(draft).propose(sequences.for_k(4), 4)
    assert proposal.probs is None
    assert proposal.token_ids.shape == (3, 4) and proposal.token_ids.dtype == torch.int64
    for row, tokens in enumerate(sequences.tokens):
        assert proposal.token_ids[row].tolist() == hf_greedy(hf, tokens, 4)[0]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_catch_up_after_partial_acceptance_equals_hf(draft, hf, k):
    rng = np.random.default_rng(k)
    sequences = Sequences(random_prompts(rng, (3, 10, 17)), [0.0] * 3, seed=k)
    proposer = make_proposer(draft)
    recorder = proposer.model = ForwardRecorder(draft.model)
    catch_up = [3, 10, 17]  # the first propose computes every prompt token
    for round_ in range(4):
        recorder.num_tokens.clear()
        proposal = proposer.propose(sequences.for_k(k), k)
        assert recorder.num_tokens == [sum(catch_up)] + [3] * (k - 1)
        catch_up = []
        for row, tokens in enumerate(sequences.tokens):
            drafts = proposal.token_ids[row].tolist()
            assert drafts == hf_greedy(hf, tokens, k)[0], f"round {round_}, sequence {row}"
            accepted = [0, k // 2, k][(row + round_) % 3]  # none, some, all
            bonus = int(rng.integers(0, SMOLLM2_VOCAB))
            while accepted < k and bonus == drafts[accepted]:  # a rejected draft differs from the target's token
                bonus = int(rng.integers(0, SMOLLM2_VOCAB))
            tokens.extend([*drafts[:accepted], bonus])
            catch_up.append(2 if accepted == k else 1)  # accepted drafts keep their KV; the last draft has none


def test_long_catch_up_runs_in_chunks_of_the_token_budget(draft, hf):
    sequences = Sequences(random_prompts(np.random.default_rng(8), (3, 10, 17)), [0.0] * 3, seed=8)
    proposer = make_proposer(draft, max_num_batched_tokens=7)
    recorder = proposer.model = ForwardRecorder(draft.model)
    proposal = proposer.propose(sequences.for_k(3), 3)
    assert recorder.num_tokens == [7, 7, 7, 7, 2, 3, 3]
    for row, tokens in enumerate(sequences.tokens):
        assert proposal.token_ids[row].tolist() == hf_greedy(hf, tokens, 3)[0]


def test_catch_up_chunks():
    chunks = list(catch_up_chunks([0, 5, 2], [3, 6, 9], budget=4))
    assert chunks == [[(0, 0, 3), (1, 5, 6)], [(2, 2, 6)], [(2, 6, 9)]]
    assert list(catch_up_chunks([0], [1], budget=1)) == [[(0, 0, 1)]]


def test_tokens_appended_without_the_drafts(draft, hf):
    """Steps that did not verify the drafts (speculation off for a while) append several tokens: the draft KV is
    kept only as far as they match the drafts written."""
    sequences = Sequences(random_prompts(np.random.default_rng(9), (6, 11)), [0.0] * 2, seed=9)
    proposer = make_proposer(draft)
    drafts = proposer.propose(sequences.for_k(4), 4).token_ids.tolist()
    sequences.tokens[0].extend([(drafts[0][0] + 1) % SMOLLM2_VOCAB, 5, 6])  # differs at once: 3 new tokens to compute
    sequences.tokens[1].extend([*drafts[1][:2], (drafts[1][2] + 1) % SMOLLM2_VOCAB, 8])  # 2 drafts match: 2 new tokens
    recorder = proposer.model = ForwardRecorder(draft.model)
    proposal = proposer.propose(sequences.for_k(2), 2)
    assert recorder.num_tokens == [3 + 2, 2]
    for row, tokens in enumerate(sequences.tokens):
        assert proposal.token_ids[row].tolist() == hf_greedy(hf, tokens, 2)[0]


def test_changed_block_is_recomputed(draft, hf):
    """A copy-on-write gives a request a fresh block: the draft KV of that block is stale and is recomputed."""
    sequences = Sequences(random_prompts(np.random.default_rng(7), (14, 6)), [0.0] * 2, seed=7)
    proposer = make_proposer(draft)
    proposer.propose(sequences.for_k(2), 2)
    for tokens in sequences.tokens:
        tokens.append(int(hf_greedy(hf, tokens, 1)[0][0]))  # the first draft accepted... or not: any token
    fresh = sequences.blocks[1][-1]  # never reached by the 6-token sequence
    sequences.blocks[0][1] = fresh  # sequence 0's second block (positions 4..7) moves to a block full of junk
    proposer.kv_cache[:, :, fresh] = torch.randn_like(proposer.kv_cache[:, :, fresh])
    recorder = proposer.model = ForwardRecorder(draft.model)
    proposal = proposer.propose(sequences.for_k(3), 3)
    assert recorder.num_tokens[0] == (15 - 4) + 1
    for row, tokens in enumerate(sequences.tokens):
        assert proposal.token_ids[row].tolist() == hf_greedy(hf, tokens, 3)[0]


def test_forget_recomputes_everything(draft, hf):
    sequences = Sequences(random_prompts(np.random.default_rng(3), (8,)), [0.0], seed=3)
    proposer = make_proposer(draft)
    proposer.propose(sequences.for_k(3), 3)
    proposer.forget("r0")
    proposer.kv_cache.normal_()  # the blocks went to someone else
    recorder = proposer.model = ForwardRecorder(draft.model)
    proposal = proposer.propose(sequences.for_k(3), 3)
    assert recorder.num_tokens[0] == 8
    assert proposal.token_ids[0].tolist() == hf_greedy(hf, sequences.tokens[0], 3)[0]


@torch.inference_mode()
def hf_last_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    return hf(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def test_sampled_rows_carry_their_distributions(draft, hf):
    temperatures = [0.7, 0.0, 1.3]
    prompts = random_prompts(np.random.default_rng(11), (5, 12, 7))
    proposal = make_proposer(draft, seed=5).propose(Sequences(prompts, temperatures, seed=1).for_k(3), 3)
    tokens, probs = proposal.token_ids, proposal.probs
    assert probs.shape == (3, 3, SMOLLM2_VOCAB) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3, 3))
    assert bool((probs.gather(2, tokens.unsqueeze(2)) > 0).all())
    for row, (prompt, temperature) in enumerate(zip(prompts, temperatures, strict=True)):
        for step in range(3):
            logits = hf_last_logits(hf, [*prompt.tolist(), *tokens[row, :step].tolist()])
            if temperature == 0.0:
                assert int(tokens[row, step]) == int(logits.argmax())
                assert float(probs[row, step, tokens[row, step]]) == 1.0
            else:
                torch.testing.assert_close(probs[row, step], (logits / temperature).softmax(-1), atol=1e-6, rtol=1e-4)


def test_same_seed_same_tokens(draft):
    prompts = random_prompts(np.random.default_rng(12), (4, 9))

    def sample(seed: int) -> torch.Tensor:
        return make_proposer(draft, seed).propose(Sequences(prompts, [1.0, 0.8], seed=2).for_k(4), 4).token_ids

    assert torch.equal(sample(21), sample(21))
    assert not torch.equal(sample(21), sample(22))


def test_empty_batch_and_short_block_table(draft):
    proposer = make_proposer(draft)
    assert proposer.propose([], 3).token_ids.shape == (0, 3)
    too_short = DraftSequence("r", np.arange(4, dtype=np.int64), block_ids=(0,), temperature=0.0)
    with pytest.raises(ValueError, match="blocks for 6 positions"):
        proposer.propose([too_short], 3)


def test_draft_with_another_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"speculative_config\.model=.*vocabulary has 512 tokens"):
        load_draft(write_draft(tmp_path, vocab_size=512))


def test_draft_with_a_padded_vocabulary_proposes_target_ids_only(tmp_path):
    draft = load_draft(write_draft(tmp_path, vocab_size=SMOLLM2_VOCAB + 64))
    with torch.no_grad():
        draft.model.lm_head.weight[SMOLLM2_VOCAB:] = 5.0  # the padding rows would win every argmax
    sequences = Sequences(random_prompts(np.random.default_rng(4), (6, 3)), [0.0, 1.0], seed=4)
    proposal = make_proposer(draft).propose(sequences.for_k(3), 3)
    assert int(proposal.token_ids.max()) < SMOLLM2_VOCAB
    assert proposal.probs.shape[-1] == SMOLLM2_VOCAB


def test_draft_shorter_than_max_model_len_is_refused(tmp_path):
    draft = load_draft(write_draft(tmp_path, max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"speculative_config\.model=.*64 positions"):
        make_proposer(draft)


def test_missing_draft_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"speculative_config\.model: "):
        load_draft(tmp_path / "absent")


def test_kv_budget_holds_both_caches(draft):
    per_block = draft.kv_bytes_per_block(BLOCK_SIZE)
    assert per_block == 2 * 2 * BLOCK_SIZE * 2 * 16 * 4  # layers, K+V, tokens, kv heads, head dim, fp32
    cache = CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory=100 * per_block)
    kv_cache, num_blocks = allocate_kv_cache(
        draft.model, cache, SchedulerConfig(), torch.float32, torch.device("cpu"), extra_bytes_per_block=per_block
    )
    assert num_blocks == 50 and kv_cache.shape[2] == 50
    assert make_proposer(draft).kv_cache.shape == (2, 2, NUM_BLOCKS, BLOCK_SIZE, 2, 16)


def test_common_prefix_length():
    assert common_prefix_length(np.array([1, 2, 3]), np.array([1, 2, 4, 5])) == 2
    assert common_prefix_length(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert common_prefix_length(np.array([], dtype=np.int64), np.array([1])) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_on_cuda(draft_dir, hf, dtype):
    """fp32 on CUDA (Triton kernels) proposes HF's tokens; bf16 rounds differently, so it is checked for shape,
    range and that its sampled distributions are distributions."""
    cuda_draft = load_draft(draft_dir, "cuda", dtype)
    sequences = Sequences(random_prompts(np.random.default_rng(5), (2, 19, 40)), [0.0, 0.0, 0.9], seed=5)
    proposer = make_proposer(cuda_draft)
    for _ in range(2):
        proposal = proposer.propose(sequences.for_k(4), 4)
        token_ids = proposal.token_ids.cpu()
        assert token_ids.shape == (3, 4) and int(token_ids.max()) < SMOLLM2_VOCAB
        torch.testing.assert_close(proposal.probs.sum(-1).cpu(), torch.ones(3, 4))
        for row in range(2):
            if dtype == torch.float32:
                assert token_ids[row].tolist() == hf_greedy(hf, sequences.tokens[row], 4)[0]
        for row, tokens in enumerate(sequences.tokens):
            tokens.extend([*token_ids[row, :row].tolist(), 7])

"""LLMEngine's collaborators on CPU without a model: sample forking, stop checks, validation, KV transfer."""

from __future__ import annotations

import pytest
import torch

from common.engine.kv_cache_manager import BlockCopy
from common.engine.kv_transfer import KVTransfer
from common.engine.model_runner import RunnerOutput
from common.engine.request import RequestStatus
from common.engine.request_lifecycle import RequestLifecycle
from common.engine.request_validation import RequestValidator
from common.engine.sampled_tokens import SampledTokenApplier
from common.engine.sampling_params import SamplingParams
from common.engine.stats import EngineStatsRecorder
from common.engine.stop_conditions import token_stop_status
from tests.common.engine.test_scheduler import BS, make_request, make_scheduler

MAX_MODEL_LEN = 32
CACHE_SHAPE = (2, 2, 8, BS, 1, 3)  # [layers, k/v, blocks, block_size, kv_heads, head_dim]


class Pool:
    """One side of a disaggregated pair: a scheduler, the engine's collaborators and a CPU KV cache."""

    def __init__(self, num_blocks: int = 8) -> None:
        self.scheduler = make_scheduler(num_blocks)
        self.kv = self.scheduler.kv_cache
        self.validator = RequestValidator(None, vocab_size=100, max_model_len=MAX_MODEL_LEN)
        self.requests = RequestLifecycle(self.scheduler, self.kv, EngineStatsRecorder(), None, frozenset({99}), BS)
        self.cache = torch.zeros(CACHE_SHAPE[:2] + (num_blocks,) + CACHE_SHAPE[3:])
        self.transfer = KVTransfer(self.kv, self.cache, self.requests, self.validator)
        self.applier = SampledTokenApplier(self.requests, self.transfer, MAX_MODEL_LEN)

    def add(self, tokens: list[int], params: SamplingParams, export_kv: bool = False) -> str:
        return self.requests.add(None, tokens, params, (), None, export_kv)

    def step(self, tokens: dict[str, list[int]]):
        """Schedule, mark computed and apply the given sampled tokens (as a runner would return them)."""
        out = self.scheduler.schedule()
        self.scheduler.on_step_done(out)
        sampled = {rid: [(token, None) for token in ids] for rid, ids in tokens.items()}
        return out, self.applier.apply(out, RunnerOutput(sampled=sampled), only_finished=False)


def test_fork_samples_shares_every_block_and_allocates_only_on_copy_on_write():
    pool = Pool(num_blocks=16)
    rid = pool.add(list(range(6)), SamplingParams(n=3, max_tokens=4))
    pool.scheduler.on_step_done(pool.scheduler.schedule())
    head = pool.requests.groups[rid].head
    assert pool.kv.block_ids(rid) == [0, 1] and pool.kv.pool.num_free_blocks == 14

    samples = pool.requests.fork_samples(head, 3)

    assert [s.request_id for s in samples] == ["req-0", "req-0#1", "req-0#2"]
    assert all(pool.kv.block_ids(s.request_id) == [0, 1] for s in samples)
    assert [b.ref_cnt for b in pool.kv.pool.blocks[:2]] == [3, 3] and pool.kv.pool.num_free_blocks == 14
    assert pool.scheduler.running[-2:] == samples[1:] and pool.requests.groups[rid].samples == samples
    assert head.pending_forks == 0
    for index, sample in enumerate(samples):
        sample.append_output_token(10 + index, None)
    out = pool.scheduler.schedule()  # the first two writers copy the shared partial block 1; the last keeps it
    assert out.block_copies == (BlockCopy(src=1, dst=2), BlockCopy(src=1, dst=3))
    assert [pool.kv.block_ids(s.request_id) for s in samples] == [[0, 2], [0, 3], [0, 1]]


def test_applier_forks_on_the_prompts_last_step_and_finishes_each_sample():
    pool = Pool(num_blocks=16)
    rid = pool.add(list(range(6)), SamplingParams(n=2, max_tokens=1))
    _, outputs = pool.step({rid: [7, 8]})
    (output,) = outputs
    assert [c.token_ids for c in output.outputs] == [[7], [8]] and output.finished
    assert [c.finish_reason for c in output.outputs] == ["length", "length"]
    assert pool.requests.groups == {} and pool.kv.pool.num_free_blocks == 16


def test_abort_finishes_every_sample_and_returns_every_block():
    pool = Pool(num_blocks=16)
    rid = pool.add(list(range(6)), SamplingParams(n=2, max_tokens=5))
    pool.step({rid: [7, 8]})
    pool.requests.abort(rid)
    pool.requests.abort("unknown")
    assert pool.requests.groups == {} and pool.kv.pool.num_free_blocks == 16 and not pool.scheduler.running


def test_token_stop_status_order_min_tokens_stop_token_eos_and_lengths():
    def sample(**params):
        request = make_request("s", [1, 2, 3])
        request.sampling_params = SamplingParams(**params)
        request.eos_token_ids = frozenset({99})
        return request

    early = sample(min_tokens=2, stop_token_ids=[5])
    early.append_output_token(5, None)
    assert token_stop_status(early, 5, MAX_MODEL_LEN) is None
    stopped = sample(stop_token_ids=[5])
    stopped.append_output_token(5, None)
    assert token_stop_status(stopped, 5, MAX_MODEL_LEN) is RequestStatus.FINISHED_STOPPED and stopped.stop_reason == 5
    eos, ignoring = sample(), sample(ignore_eos=True)
    for request in (eos, ignoring):
        request.append_output_token(99, None)
    assert token_stop_status(eos, 99, MAX_MODEL_LEN) is RequestStatus.FINISHED_STOPPED and eos.stop_reason is None
    assert token_stop_status(ignoring, 99, MAX_MODEL_LEN) is None
    assert token_stop_status(ignoring, 99, 4) is RequestStatus.FINISHED_LENGTH  # 3 prompt + 1 output tokens
    capped = sample(max_tokens=1)
    capped.append_output_token(4, None)
    assert token_stop_status(capped, 4, MAX_MODEL_LEN) is RequestStatus.FINISHED_LENGTH


def test_validator_names_what_is_wrong():
    validator = RequestValidator(None, vocab_size=100, max_model_len=8)
    assert validator.validate_prompt(None, [1, 2], SamplingParams()) == [1, 2]
    for prompt, ids, message in [
        ("text", None, "needs a tokenizer"),
        (None, [], "empty"),
        (None, [100], r"\[0, 100\)"),
        (None, list(range(8)), "too long"),
    ]:
        with pytest.raises(ValueError, match=message):
            validator.validate_prompt(prompt, ids, SamplingParams())
    with pytest.raises(ValueError, match="KV export"):
        validator.validate_resume([1], [], SamplingParams(n=2), export_kv=True)
    with pytest.raises(ValueError, match="reach max_model_len"):
        validator.validate_resume([1, 2, 3, 4], [5, 6, 7, 8], SamplingParams(), export_kv=False)


def test_kv_round_trip_from_prefill_export_to_decode_reservation_with_exact_block_ids():
    prefill, decode = Pool(), Pool()
    decode.kv.reserve("other", 3)  # occupies block 0, so the reservation lands elsewhere
    rid = prefill.add(list(range(1, 7)), SamplingParams(max_tokens=1), export_kv=True)
    prefill.cache.copy_(torch.arange(prefill.cache.numel(), dtype=torch.float32).view(prefill.cache.shape))
    _, (output,) = prefill.step({rid: [42]})
    assert output.finished and output.outputs[0].token_ids == [42]
    assert torch.equal(output.exported_kv, prefill.cache[:, :, [0, 1]])  # 6 computed tokens: blocks 0 and 1
    assert prefill.kv.pool.num_free_blocks == 8  # exported before the blocks went back

    assert decode.transfer.reserve_blocks("resv", 6) == [1, 2]
    decode.transfer.import_kv("resv", output.exported_kv)
    assert torch.equal(decode.cache[:, :, [1, 2]], output.exported_kv)
    assert decode.cache[:, :, [0, 3]].abs().sum() == 0
    decode_id = decode.transfer.add_prefilled_request("resv", list(range(1, 7)), [42], SamplingParams(max_tokens=3))

    head = decode.requests.groups[decode_id].head
    assert decode_id == "resv" and decode.kv.block_ids("resv") == [1, 2] and head.num_computed_tokens == 6
    assert decode.scheduler.running == [head]
    out, _ = decode.step({"resv": [43]})
    (item,) = out.scheduled
    assert (item.num_computed_tokens, item.num_new_tokens, item.block_ids) == (6, 1, (1, 2))


def test_kv_transfer_refuses_what_does_not_fit_and_release_returns_the_blocks():
    pool = Pool()
    live = pool.add([1, 2], SamplingParams())
    refused = [("r", 0, "outside"), ("r", MAX_MODEL_LEN, "outside"), (live, 3, "in use")]
    for reservation_id, num_tokens, message in refused:
        with pytest.raises(ValueError, match=message):
            pool.transfer.reserve_blocks(reservation_id, num_tokens)
    assert pool.transfer.reserve_blocks("r", 5) == [0, 1]
    with pytest.raises(ValueError, match="in use"):
        pool.transfer.reserve_blocks("r", 1)
    with pytest.raises(ValueError, match="does not fit"):
        pool.transfer.import_kv("r", torch.zeros(CACHE_SHAPE[:2] + (3,) + CACHE_SHAPE[3:]))
    with pytest.raises(ValueError, match="unknown or expired"):
        pool.transfer.import_kv("missing", torch.zeros(CACHE_SHAPE))
    with pytest.raises(ValueError, match="first sampled token"):
        pool.transfer.add_prefilled_request("r", [1, 2, 3], [], SamplingParams())
    assert pool.kv.block_ids("r") == [0, 1]  # a refused request leaves the reservation as it was
    pool.transfer.release_reservation("r")
    pool.transfer.release_reservation("r")  # a second release is a no-op
    assert pool.kv.pool.num_free_blocks == 8 and "r" not in pool.kv.tables

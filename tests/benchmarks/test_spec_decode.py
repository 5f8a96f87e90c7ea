"""benchmarks/spec_decode.py without a model: the break-even solver, the workload, TPOT and output comparison,
the forced drafts and the run-time estimate."""

from __future__ import annotations

import pytest

from benchmarks.spec_decode import (
    ForcedDrafts,
    Trace,
    break_even_alpha,
    idle_cases,
    mismatches,
    parse_args,
    predicted_seconds,
    repetitive_messages,
)
from common.engine.request import Request
from common.engine.sampling_params import SamplingParams
from common.engine.spec.ngram import NgramProposer


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_break_even_alpha_inverts_the_geometric_model(k, alpha):
    emitted = (1 - alpha ** (k + 1)) / (1 - alpha)
    assert break_even_alpha(k, emitted) == pytest.approx(alpha, abs=1e-3)


def test_break_even_alpha_edges():
    assert break_even_alpha(4, 0.8) == 0.0  # the verify step is cheaper than a plain one: anything pays
    assert break_even_alpha(4, 5.0) == pytest.approx(1.0, abs=1e-3)
    assert break_even_alpha(4, 5.1) is None  # not even accepting every draft pays
    assert break_even_alpha(1, 1.5) == pytest.approx(0.5, abs=1e-3)


def test_repetitive_messages_cycle_the_three_families_deterministically():
    chats = repetitive_messages(32)
    assert chats == repetitive_messages(32) and len(chats) == 32
    texts = [chat[0]["content"] for chat in chats]
    assert all(chat[0]["role"] == "user" and len(chat) == 1 for chat in chats)
    assert texts[0].startswith("Here is a function") and "```python" in texts[0]
    assert "paragraph" in texts[1] or "text" in texts[1]
    assert texts[2].startswith("Continue the list")
    assert len(set(texts)) == 32  # no prompt repeats within the default count


def test_trace_tpot_counts_the_tokens_after_the_first_output():
    trace = Trace(first_at=1.0, first_count=1, finished_at=1.5, token_ids=list(range(11)))
    assert trace.tpot_ms() == pytest.approx(50.0)
    assert Trace(first_at=1.0, first_count=1, finished_at=1.0, token_ids=[7]).tpot_ms() is None


def test_mismatches_report_the_first_differing_position():
    reference = [Trace(token_ids=[1, 2, 3]), Trace(token_ids=[4, 5]), Trace(token_ids=[6, 7, 8])]
    assert mismatches(reference, reference) == (0, [])
    got = [Trace(token_ids=[1, 2, 3]), Trace(token_ids=[4, 9]), Trace(token_ids=[6, 7])]
    assert mismatches(reference, got) == (2, [1, 2])


def test_forced_drafts_propose_k_tokens_every_step_without_backing_off():
    forced = ForcedDrafts(3, vocab_size=1000, max_model_len=4096)
    request = Request("r", [5] * 16, SamplingParams(max_tokens=100), frozenset({2}), block_size=16)
    for _ in range(10):  # well past MISSES_BEFORE_BACKOFF rejections
        drafts = forced.drafts_for(request, num_running=1, max_drafts=16)
        assert len(drafts) == 3 and all(100 <= t < 900 for t in drafts)
        assert request.speculating
        forced.on_verified(request, 0)
    assert len(forced.drafts_for(request, num_running=1, max_drafts=2)) == 2  # the scheduler's budget still binds
    plain_sync = ForcedDrafts(0, vocab_size=1000, max_model_len=4096)
    assert plain_sync.drafts_for(request, 1, 16) == () and request.speculating


def test_default_run_is_predicted_to_fit_the_gpu_stage(monkeypatch):
    monkeypatch.setattr("sys.argv", ["spec_decode"])
    args = parse_args()
    assert args.part == ["tpot", "verify", "idle"] and args.batches == [1, 16] and args.verify_ks == list(range(1, 9))
    assert sum(predicted_seconds(args).values()) < 560  # gpu_run.sh's limit for the stage


def test_idle_cases_give_ngram_nothing_on_random_prompts(monkeypatch):
    monkeypatch.setattr("sys.argv", ["spec_decode", "--idle-prompts", "4", "--idle-prompt-len", "100"])
    chats = [{"prompt": f"chat {i}"} for i in range(6)]
    cases = idle_cases(parse_args(), vocab=49152, chat_prompts=chats)
    assert [(name, temperature) for name, _, temperature in cases] == [("random", 0.0), ("random", 1.0), ("chat", 1.0)]
    assert cases[2][1] == chats[:4]
    proposer = NgramProposer(4, 2, 4)
    for _, prompts, _ in cases[:2]:
        assert len(prompts) == 4 and all(len(p["prompt_token_ids"]) == 100 for p in prompts)
        assert not any(proposer.propose(p["prompt_token_ids"], 4) for p in prompts)

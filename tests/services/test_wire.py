"""services.wire's logprob conversions: the engine's vLLM-style dicts cross the worker RPCs unchanged.

References are the engine's own prompt logprobs (``compute_prompt_logprobs`` on random logits, as a prefill or
decode worker computes them) in the ``RequestOutput.prompt_logprobs`` layout; proto floats are 32-bit, as the
engine's log_softmax is.
"""

from __future__ import annotations

import pytest
import torch

from common.engine.outputs import Logprob
from common.engine.sampler import compute_prompt_logprobs
from proto import worker_pb2
from services.wire import prompt_logprobs_from_proto, prompt_logprobs_to_proto

VOCAB = 50


def engine_prompt_logprobs(prompt: list[int], k: int) -> list[dict[int, Logprob] | None]:
    """What ``RequestOutput.prompt_logprobs`` holds for ``prompt``: None, then one dict per later token."""
    logits = torch.randn(len(prompt) - 1, VOCAB, generator=torch.Generator().manual_seed(len(prompt) + k))
    return [None, *(entry.to_dict() for entry in compute_prompt_logprobs(logits, prompt[1:], k))]


def as_values(entries) -> list[dict[int, tuple[float, int]] | None]:
    return [None if e is None else {t: (pytest.approx(lp.logprob, abs=1e-6), lp.rank) for t, lp in e.items()}
            for e in entries]


@pytest.mark.parametrize("k", [0, 1, 5])
@pytest.mark.parametrize("length", [1, 2, 17])
def test_prompt_logprobs_round_trip_with_the_leading_none(k, length):
    prompt = [(7 * i + 3) % VOCAB for i in range(length)]
    entries = engine_prompt_logprobs(prompt, k) if length > 1 else [None]
    messages = prompt_logprobs_to_proto(prompt, entries)
    assert len(messages) == length - 1
    carried = worker_pb2.PrefillReply.FromString(
        worker_pb2.PrefillReply(prompt_logprobs=messages).SerializeToString()).prompt_logprobs
    back = prompt_logprobs_from_proto(carried)
    assert as_values(back) == as_values(entries)
    for entry, original in zip(back[1:], entries[1:], strict=True):
        assert list(entry) == list(original)  # the prompt token first, then the alternatives by rank


def test_a_prompt_token_outside_the_top_k_keeps_its_rank():
    prompt = [1, 2, 3]
    entries = [None, {2: Logprob(-9.0, 40), 5: Logprob(-0.1, 1)}, {3: Logprob(-0.2, 1)}]
    back = prompt_logprobs_from_proto(prompt_logprobs_to_proto(prompt, entries))
    assert as_values(back) == as_values(entries)


@pytest.mark.parametrize("entries", [[None, None], [None], [{1: Logprob(-1.0, 1)}, {2: Logprob(-1.0, 1)}]])
def test_prompt_logprobs_that_do_not_cover_the_prompt_are_refused(entries):
    with pytest.raises(ValueError, match="prompt logprobs cover"):
        prompt_logprobs_to_proto([1, 2], entries)

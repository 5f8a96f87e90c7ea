"""The prefill service's engine request: what a first prefill and a migration's re-prefill ask the engine for."""

from __future__ import annotations

from common.engine.sampling_params import SamplingParams
from services.prefill.service import first_token_request


def test_only_a_first_prefill_computes_the_prompt_logprobs():
    """A migration re-prefills prompt + delivered tokens; the first token already carried the prompt's logprobs."""
    params = SamplingParams(max_tokens=8, prompt_logprobs=2)
    assert first_token_request(params, [1, 2, 3], num_generated=0)[2].prompt_logprobs == 2
    prompt, generated, local = first_token_request(params, [1, 2, 3, 7, 8], num_generated=2)
    assert (prompt, generated, local.prompt_logprobs) == ([1, 2, 3], [7, 8], None)

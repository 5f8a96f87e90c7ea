"""SamplingParams: vLLM defaults, input normalization and exact validation messages."""

from __future__ import annotations

import dataclasses
import re

import pytest

from common.engine.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert params.seed is None and params.logit_bias is None
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert params.stop == () and params.stop_token_ids == ()
    assert params.max_tokens == 16 and params.min_tokens == 0
    assert params.logprobs is None and params.prompt_logprobs is None
    assert params.skip_special_tokens and params.spaces_between_special_tokens
    assert not params.include_stop_str_in_output and not params.ignore_eos
    assert not params.is_greedy


def test_normalizes_stop_and_stop_token_ids_to_tuples() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[5, 7]).stop_token_ids == (5, 7)


def test_logit_bias_accepts_json_string_keys() -> None:
    assert SamplingParams(logit_bias={"50": -100, 7: 2}).logit_bias == {50: -100.0, 7: 2.0}


def test_is_greedy_below_threshold() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=9e-6).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy


def test_frozen_and_replace_revalidates() -> None:
    params = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 1.0  # type: ignore[misc]
    changed = params.replace(max_tokens=3, stop="x")
    assert (changed.temperature, changed.max_tokens, changed.stop) == (0.5, 3, ("x",))
    with pytest.raises(ValueError, match=re.escape("max_tokens must be at least 1, got 0")):
        params.replace(max_tokens=0)


def test_max_tokens_none_means_model_limit() -> None:
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be at least 1, got 0"),
        ({"temperature": -0.1}, "temperature must be non-negative and finite, got -0.1"),
        ({"temperature": float("nan")}, "temperature must be non-negative and finite, got nan"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_k": -2}, "top_k must be -1 or 0 (disabled) or at least 1, got -2"),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -2.1}, "frequency_penalty must be in [-2, 2], got -2.1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than 0, got 0.0"),
        ({"logit_bias": {3: 101}}, "logit_bias values must be in [-100, 100], got 101.0 for token 3"),
        ({"logit_bias": {-1: 1}}, "logit_bias token ids must be non-negative, got -1"),
        ({"logit_bias": {"x": 1}}, "logit_bias must map token ids to numbers, got 'x': 1"),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"min_tokens": -1}, "min_tokens must be non-negative, got -1"),
        (
            {"min_tokens": 10, "max_tokens": 5},
            "min_tokens must be less than or equal to max_tokens=5, got 10",
        ),
        ({"logprobs": 21}, "logprobs must be in [0, 20], got 21"),
        ({"logprobs": -1}, "logprobs must be in [0, 20], got -1"),
        ({"prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20], got 21"),
        ({"stop": ["ok", ""]}, "stop strings must be non-empty strings, got ''"),
        ({"stop_token_ids": [-3]}, "stop_token_ids must be non-negative ints, got -3"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"max_tokens": 2.0}, "max_tokens must be an integer, got 2.0"),
    ],
)
def test_validation_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [{"top_k": -1}, {"top_k": 1}, {"logprobs": 0}, {"logprobs": 20}])
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_check_token_ids_against_vocab() -> None:
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]).check_token_ids(10)
    with pytest.raises(ValueError, match=re.escape("token id 10 is out of vocabulary (size 10)")):
        SamplingParams(stop_token_ids=[10]).check_token_ids(10)

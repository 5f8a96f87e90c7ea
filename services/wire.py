"""Conversions between engine types and the worker RPC messages (proto/worker.proto)."""

from __future__ import annotations

from common.engine.outputs import Logprob
from common.engine.sampling_params import SamplingParams
from proto import worker_pb2


def sampling_to_proto(params: SamplingParams) -> worker_pb2.SamplingOptions:
    options = worker_pb2.SamplingOptions(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, logit_bias=dict(params.logit_bias or {}),
        stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
        include_stop_str_in_output=params.include_stop_str_in_output, ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens, skip_special_tokens=params.skip_special_tokens,
    )
    if params.seed is not None:
        options.seed = params.seed
    if params.max_tokens is not None:
        options.max_tokens = params.max_tokens
    if params.logprobs is not None:
        options.logprobs = params.logprobs
    return options


def sampling_from_proto(options: worker_pb2.SamplingOptions) -> SamplingParams:
    """Rebuild (and so re-validate) SamplingParams; a bad field raises ValueError naming it."""
    return SamplingParams(
        temperature=options.temperature, top_p=options.top_p, top_k=options.top_k, min_p=options.min_p,
        seed=options.seed if options.HasField("seed") else None,
        presence_penalty=options.presence_penalty, frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repetition_penalty, logit_bias=dict(options.logit_bias) or None,
        stop=list(options.stop) or None, stop_token_ids=list(options.stop_token_ids),
        include_stop_str_in_output=options.include_stop_str_in_output, ignore_eos=options.ignore_eos,
        max_tokens=options.max_tokens if options.HasField("max_tokens") else None,
        min_tokens=options.min_tokens, logprobs=options.logprobs if options.HasField("logprobs") else None,
        skip_special_tokens=options.skip_special_tokens,
    )


def logprobs_to_proto(token_id: int, entries: dict[int, Logprob]) -> worker_pb2.TokenLogprobs:
    """vLLM-style {token: Logprob} for one position -> proto. Entries sorted by rank are exactly the
    top-k alternatives (ranks 1..k), plus the sampled token when it ranks below them."""
    ranked = sorted(entries.items(), key=lambda item: item[1].rank or 0)
    sampled = entries[token_id]
    return worker_pb2.TokenLogprobs(
        token_id=token_id, logprob=sampled.logprob, rank=sampled.rank or 0,
        top_token_ids=[t for t, _ in ranked], top_logprobs=[e.logprob for _, e in ranked],
    )


def logprobs_from_proto(message: worker_pb2.TokenLogprobs) -> dict[int, Logprob]:
    entries = {message.token_id: Logprob(message.logprob, message.rank)}
    for rank, (token_id, logprob) in enumerate(zip(message.top_token_ids, message.top_logprobs), start=1):
        entries.setdefault(token_id, Logprob(logprob, rank))
    return entries

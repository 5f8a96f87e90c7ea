"""Conversions between engine types and the worker RPC messages (proto/worker.proto)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from common.engine.outputs import Logprob
from common.engine.sampling_params import SamplingParams, StructuredOutputs
from proto import worker_pb2

_EMPTY_MEANS_NONE = frozenset({"logit_bias"})
"""Fields whose None crosses the wire as an empty map (proto has no null container); both mean "none"."""


def _wire_kind(name: str) -> str | None:
    """How SamplingParams' field `name` is carried: map | repeated | optional | scalar | structured (the
    StructuredOutputs message); None: the proto lacks it."""
    field = worker_pb2.SamplingOptions.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        return None
    if name == "structured_outputs":
        return "structured"
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return "map"
    if field.is_repeated:
        return "repeated"
    return "optional" if field.has_presence else "scalar"


_WIRE_KINDS = {field.name: _wire_kind(field.name) for field in dataclasses.fields(SamplingParams)}
"""Every SamplingParams field, in declaration order, with how the proto carries it (computed once)."""


def sampling_to_proto(params: SamplingParams) -> worker_pb2.SamplingOptions:
    """Every SamplingParams field, by name; a field the proto lacks raises ValueError (never silently dropped)."""
    options = worker_pb2.SamplingOptions()
    for name, kind in _WIRE_KINDS.items():
        value = getattr(params, name)
        if kind is None:
            raise ValueError(f"SamplingParams.{name} has no field in worker.proto's SamplingOptions")
        if kind == "structured":
            if value is not None:
                options.structured_outputs.CopyFrom(structured_to_proto(value))
        elif kind == "map":
            getattr(options, name).update(value or {})
        elif kind == "repeated":
            getattr(options, name).extend(value)
        elif value is not None:  # None leaves an `optional` field unset
            setattr(options, name, value)
    return options


def sampling_from_proto(options: worker_pb2.SamplingOptions) -> SamplingParams:
    """Rebuild (and so re-validate) SamplingParams; a bad field raises ValueError naming it."""
    return SamplingParams(**{name: _field_from_proto(options, name, kind) for name, kind in _WIRE_KINDS.items()})


def _field_from_proto(options: worker_pb2.SamplingOptions, name: str, kind: str | None) -> Any:
    if kind is None:
        raise ValueError(f"SamplingParams.{name} has no field in worker.proto's SamplingOptions")
    if kind == "structured":
        return structured_from_proto(options.structured_outputs) if options.HasField(name) else None
    value = getattr(options, name)
    if kind == "map":
        return dict(value) or (None if name in _EMPTY_MEANS_NONE else {})
    if kind == "repeated":
        return list(value)
    if kind == "optional" and not options.HasField(name):
        return None
    return value


def structured_to_proto(spec: StructuredOutputs) -> worker_pb2.StructuredOutputs:
    """Field by field; ``choice`` None crosses as an empty list (a set choice is never empty)."""
    return worker_pb2.StructuredOutputs(
        json=spec.json, json_object=spec.json_object, regex=spec.regex, choice=spec.choice or (), grammar=spec.grammar
    )


def structured_from_proto(message: worker_pb2.StructuredOutputs) -> StructuredOutputs:
    """Rebuild (and so re-validate: exactly one kind) a constraint; ValueError naming what is wrong."""

    def optional(name: str) -> str | None:
        return getattr(message, name) if message.HasField(name) else None

    return StructuredOutputs(
        json=optional("json"),
        json_object=message.json_object,
        regex=optional("regex"),
        choice=tuple(message.choice) or None,
        grammar=optional("grammar"),
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


def prompt_logprobs_to_proto(
    prompt_token_ids: Sequence[int], entries: Sequence[dict[int, Logprob] | None]
) -> list[worker_pb2.TokenLogprobs]:
    """The engine's ``RequestOutput.prompt_logprobs`` (``[None, {token: Logprob}, ...]``, one per prompt token) ->
    one message per prompt token after the first. ValueError when the list does not cover the prompt exactly."""
    shape_ok = not entries or (entries[0] is None and all(entry is not None for entry in entries[1:]))
    if len(entries) != len(prompt_token_ids) or not shape_ok:
        raise ValueError(f"prompt logprobs cover {len(entries)} positions of a {len(prompt_token_ids)}-token prompt")
    return [logprobs_to_proto(token, entry) for token, entry in zip(prompt_token_ids[1:], entries[1:], strict=True)]


def prompt_logprobs_from_proto(
    messages: Sequence[worker_pb2.TokenLogprobs],
) -> tuple[dict[int, Logprob] | None, ...]:
    """The inverse: ``(None, {token: Logprob}, ...)``; the leading None stands for the first prompt token."""
    return (None, *(logprobs_from_proto(message) for message in messages))

"""Per-request sampling settings, with vLLM's field names, defaults and validation ranges."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GREEDY_TEMPERATURE_EPS = 1e-5
"""Temperatures below this mean greedy decoding (argmax), as in vLLM."""

MAX_LOGPROBS = 20
"""Most alternatives a request may ask for per position (OpenAI's limit, vLLM's default)."""

MAX_LOGIT_BIAS = 100.0
# Integer fields travel as int32 (seed as int64) between router and workers: larger values are the client's error.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on what a request may generate (vLLM's ``StructuredOutputsParams``).

    Exactly one constraint kind is set (ValueError otherwise); ``choice`` is a non-empty tuple of strings; a
    ``json`` schema given as a dict (as JSON clients send it) is kept as its JSON text. The engine compiles it
    into a token grammar when it admits the request (an invalid schema, regex or grammar is a ValueError then);
    here only the shape is checked, so the router can build one cheaply.
    """

    json: str | None = None  # a JSON schema, as JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF (GBNF, ``root ::= ...``) or Lark (``start: ...``) text

    def __post_init__(self) -> None:
        if isinstance(self.json, Mapping):
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a list of strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice:
                raise ValueError("structured_outputs.choice must not be empty")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, got {type(value).__name__}")
        kinds = self.kinds
        if len(kinds) != 1:
            given = " and ".join(kinds) if kinds else "none"
            raise ValueError(
                f"structured_outputs takes exactly one of json, json_object, regex, choice, grammar; got {given}"
            )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The names of the constraint kinds that are set (exactly one after construction)."""
        values = {
            "json": self.json,
            "json_object": self.json_object or None,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
        }
        return tuple(name for name, value in values.items() if value is not None)

    @property
    def kind(self) -> str:
        return self.kinds[0]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    Invariants after construction: every field is in range (otherwise `ValueError` naming the field and
    the value); `stop` is a tuple of non-empty strings; `stop_token_ids` is a tuple of ints;
    `logit_bias` maps int token ids to floats. `top_k` of 0 or -1 means off. `structured_outputs`, when set,
    constrains every generated token to its grammar (see common/engine/structured.py). Greedy requests
    (`is_greedy`) ignore top_p, top_k, min_p and seed. `max_tokens=None` means up to the model's length.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        self._normalize()
        self._validate_sampling()
        self._validate_penalties()
        self._validate_lengths()
        self._validate_logprobs()
        self._validate_stops()
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            kind = type(self.structured_outputs).__name__
            raise ValueError(f"structured_outputs must be a StructuredOutputs, got {kind}")

    # -- normalization ---------------------------------------------------------------------------------

    def _normalize(self) -> None:
        """Turn the accepted input shapes (str, list, JSON-style str keys) into the canonical ones."""
        stop = self.stop
        if stop is None:
            stop_tuple: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stop_tuple = (stop,)
        else:
            stop_tuple = tuple(stop)
        object.__setattr__(self, "stop", stop_tuple)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        if isinstance(self.structured_outputs, Mapping):
            object.__setattr__(self, "structured_outputs", _structured_from_mapping(self.structured_outputs))

    # -- validation ------------------------------------------------------------------------------------

    def _validate_sampling(self) -> None:
        _require_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be non-negative and finite, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _require_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _require_int("seed", self.seed, INT64_MAX)

    def _validate_penalties(self) -> None:
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not (self.repetition_penalty > 0.0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be greater than 0, got {self.repetition_penalty}")
        for token_id, bias in (self.logit_bias or {}).items():
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}")
            if token_id < 0:
                raise ValueError(f"logit_bias token ids must be non-negative, got {token_id}")
            if token_id > INT32_MAX:
                raise ValueError(f"logit_bias token ids must be at most {INT32_MAX}, got {token_id}")

    def _validate_lengths(self) -> None:
        if self.max_tokens is not None:
            _require_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        _require_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            limit = f"max_tokens={self.max_tokens}"
            raise ValueError(f"min_tokens must be less than or equal to {limit}, got {self.min_tokens}")

    def _validate_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            _require_int(name, value)
            if not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    def _validate_stops(self) -> None:
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        for token_id in self.stop_token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"stop_token_ids must be non-negative ints, got {token_id!r}")
            if token_id > INT32_MAX:
                raise ValueError(f"stop_token_ids must be at most {INT32_MAX}, got {token_id}")

    # -- queries ---------------------------------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        """True when the request decodes by argmax (temperature below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_top_k(self) -> bool:
        """True when top-k filtering is on for a sampled (non-greedy) request."""
        return self.top_k > 0

    @property
    def has_penalties(self) -> bool:
        """True when any repetition, frequency or presence penalty changes the logits."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes` applied; it is validated like a fresh object."""
        return dataclasses.replace(self, **changes)

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError if logit_bias or stop_token_ids name a token outside `[0, vocab_size)`.

        The engine calls this when it admits a request, so the sampler never sees an invalid id.
        """
        for token_id in (*(self.logit_bias or {}), *self.stop_token_ids):
            if token_id >= vocab_size:
                raise ValueError(f"token id {token_id} is out of vocabulary (size {vocab_size})")


def _require_int(name: str, value: object, limit: int = INT32_MAX) -> None:
    """An int within [-limit - 1, limit]: the wire (proto/worker.proto) carries these fields as int32 (seed: int64)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not -limit - 1 <= value <= limit:
        raise ValueError(f"{name} must be at most {limit} in magnitude, got {value}")


def _structured_from_mapping(fields: Mapping[str, Any]) -> StructuredOutputs:
    """Accept a JSON-style ``{"json": {...}}`` / ``{"choice": [...]}`` as clients send it."""
    known = {field.name for field in dataclasses.fields(StructuredOutputs)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"structured_outputs: unknown field {unknown[0]!r} (expected one of {sorted(known)})")
    return StructuredOutputs(**fields)


def _normalize_logit_bias(bias: Mapping[Any, Any]) -> dict[int, float]:
    """Accept JSON-style string keys ("50256": -100) as OpenAI clients send them."""
    normalized: dict[int, float] = {}
    for key, value in bias.items():
        try:
            normalized[int(key)] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must map token ids to numbers, got {key!r}: {value!r}") from None
    return normalized

"""The ``--speculative-config`` schema: the same JSON vLLM takes (``{"method": "ngram", ...}``), validated once.

Imported lazily by ``common.config`` (pydantic is not needed for ``tandem --help``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_SPECULATIVE_TOKENS = 16

SpeculativeMethod = Literal["ngram", "draft_model", "eagle", "eagle3"]


class SpeculativeConfig(BaseModel):
    """How the decode pool speculates: who proposes ``num_speculative_tokens`` tokens per step.

    ``ngram`` looks the newest ``prompt_lookup_max``..``prompt_lookup_min`` tokens up earlier in the sequence and
    proposes what followed them; ``draft_model`` runs ``model`` (a smaller model with the target's tokenizer);
    ``eagle``/``eagle3`` load an EAGLE head from ``model``. A missing ``method`` with a ``model`` means draft_model.
    ``disable_by_batch_size``: no speculation in a step whose batch holds more sequences than this (gains shrink
    with the batch; a large batch is compute-bound already).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: SpeculativeMethod | None = None
    num_speculative_tokens: int = Field(ge=1, le=MAX_SPECULATIVE_TOKENS)
    model: str | None = None
    prompt_lookup_max: int | None = Field(default=None, ge=1)
    prompt_lookup_min: int | None = Field(default=None, ge=1)
    disable_by_batch_size: int | None = Field(default=None, ge=1)
    adaptive: bool = True  # Tandem's extension: False drafts whenever a proposal exists (no step-cost gate)

    @model_validator(mode="after")
    def _complete(self) -> SpeculativeConfig:
        method = self.method or ("draft_model" if self.model else None)
        if method is None:
            raise ValueError("method: give one of ngram, draft_model, eagle, eagle3 (or a draft `model`)")
        if method != "ngram" and not self.model:
            raise ValueError(f"model: method {method!r} needs the path of its draft model or head")
        if method == "ngram" and self.model:
            raise ValueError("model: method 'ngram' takes no model")
        low = self.prompt_lookup_min or self.prompt_lookup_max or 5
        high = self.prompt_lookup_max or max(low, 5)
        if method == "ngram" and low > high:
            raise ValueError(f"prompt_lookup_min ({low}) must not exceed prompt_lookup_max ({high})")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)
        return self

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig:
        """A JSON text, a dict or a SpeculativeConfig -> a validated SpeculativeConfig (ValueError naming the key)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config: not JSON ({exc.msg} at character {exc.pos})") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: expected a JSON object, got {type(value).__name__}")
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = "".join(f".{part}" for part in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            raise ValueError(f"speculative_config{where}: {message}") from None

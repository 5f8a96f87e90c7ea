"""Request checks that run before any engine state changes, so a bad request raises ValueError and nothing else."""

from __future__ import annotations

from collections.abc import Sequence

from common.engine.sampling_params import SamplingParams
from common.engine.structured import GrammarCompiler


class RequestValidator:
    """Checks prompts and resumed outputs against the vocabulary and ``max_model_len``, and compiles a request's
    structured-output constraint (into ``grammars``' cache); never mutates any request state."""

    def __init__(
        self, tokenizer, vocab_size: int, max_model_len: int, grammars: GrammarCompiler | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.grammars = grammars

    def validate_prompt(
        self, prompt: str | None, prompt_token_ids: Sequence[int] | None, params: SamplingParams
    ) -> list[int]:
        """Token ids of a prompt, or ValueError naming what is wrong with it."""
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("prompt: either a prompt string or prompt_token_ids is required")
            if self.tokenizer is None:
                raise ValueError("prompt: a text prompt needs a tokenizer; pass prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        token_ids = [int(t) for t in prompt_token_ids]
        if not token_ids:
            raise ValueError("prompt: the prompt is empty")
        vocab = self.vocab_size
        params.check_token_ids(vocab)
        self.validate_constraint(params)
        if any(t < 0 or t >= vocab for t in token_ids):
            raise ValueError(f"prompt_token_ids: token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens is too long for max_model_len {self.max_model_len} "
                "(it must leave room for at least one generated token)"
            )
        return token_ids

    def validate_constraint(self, params: SamplingParams) -> None:
        """ValueError naming the problem unless the request's structured-output constraint compiles."""
        if params.structured_outputs is None:
            return
        if self.grammars is None:
            raise ValueError("structured_outputs: this engine has no grammar compiler")
        self.grammars.compile(params.structured_outputs)

    def validate_resume(
        self, prompt_ids: list[int], output_ids: Sequence[int], params: SamplingParams, export_kv: bool
    ) -> None:
        """ValueError unless tokens already generated elsewhere (and a KV export) fit this request."""
        if export_kv and params.n != 1:
            raise ValueError("n: KV export (disaggregated prefill) takes one sample per request")
        if not output_ids:
            return
        vocab = self.vocab_size
        if any(t < 0 or t >= vocab for t in output_ids):
            raise ValueError(f"output_token_ids: token ids must be in [0, {vocab})")
        if len(prompt_ids) + len(output_ids) >= self.max_model_len:
            raise ValueError(f"output_token_ids: prompt plus generated tokens reach max_model_len {self.max_model_len}")
        if params.max_tokens is not None and len(output_ids) >= params.max_tokens:
            raise ValueError(f"output_token_ids: {len(output_ids)} tokens already meet max_tokens {params.max_tokens}")
        if params.n != 1:
            raise ValueError("n: resuming a request takes one sample")

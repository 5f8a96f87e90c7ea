"""The offline Python API in the style users know from vLLM: ``LLM(...).generate`` and ``.chat``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.config import DEFAULT_MODEL, EngineConfig
from common.engine.engine import LLMEngine
from common.engine.outputs import RequestOutput
from common.engine.sampling_params import SamplingParams
from common.lora.request import LoRARequest

PromptInput = str | Sequence[int] | Mapping[str, Any]
Message = Mapping[str, Any]

# Offline calls without explicit params decode greedily, so `LLM().chat(...)` answers deterministically.
DEFAULT_SAMPLING_PARAMS = SamplingParams(temperature=0.0, max_tokens=256)


class LLM:
    """Load a model once and run batches of prompts through the continuous-batching engine."""

    def __init__(self, model: str = DEFAULT_MODEL, **settings: Any) -> None:
        """``settings``: any engine setting of ``common.config`` by its field name (``dtype=``, ``max_model_len=``,
        ``kv_cache_memory=`` in bytes, ``enforce_eager=``, ...); an unknown name is a TypeError listing them all."""
        self.config = EngineConfig.from_kwargs(model=model, **settings)
        validate_engine_args(self.config)
        self.engine = LLMEngine(self.config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop the engine's tensor-parallel processes now (otherwise when this object is collected or at exit)."""
        self.engine.close()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion; outputs come back in input order.

        ``lora_request``: one adapter for every prompt, or one per prompt (None: the base model), as in vLLM. An
        adapter not loaded yet whose ``lora_path`` is given is loaded first (``add_lora``).

        Every prompt is validated before any is queued, so a bad one raises ValueError and runs nothing.
        """
        batch = normalize_prompts(prompts)
        params = normalize_params(sampling_params, len(batch))
        lora_names = self._lora_names(lora_request, len(batch))
        token_ids = [self.engine.validate_prompt(text, ids, p) for (text, ids), p in zip(batch, params, strict=True)]
        request_ids = [
            self.engine.add_request(text, ids, p, lora_name=name)
            for (text, _), ids, p, name in zip(batch, token_ids, params, lora_names, strict=True)
        ]
        return self._run_to_completion(request_ids)

    def _lora_names(self, lora_request: LoRARequest | Sequence[LoRARequest | None] | None, count: int) -> list:
        """Each prompt's adapter name (None: base), loading adapters given by path that are not loaded yet."""
        requests = normalize_lora_requests(lora_request, count)
        for request in {r.lora_name: r for r in requests if r is not None}.values():
            known = request.lora_name in self.engine.list_loras()
            if not known and request.lora_path:
                self.engine.add_lora(request.lora_name, request.lora_path)
            self.engine.check_lora_name(request.lora_name)
        return [r.lora_name if r is not None else None for r in requests]

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load an adapter (vLLM's ``LLM.llm_engine.add_lora``): ValueError naming what is wrong with it."""
        self.engine.add_lora(lora_request.lora_name, lora_request.lora_path)

    def remove_lora(self, lora_name: str) -> bool:
        return self.engine.remove_lora(lora_name)

    def list_loras(self) -> list[str]:
        return self.engine.list_loras()

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("messages: chat needs a tokenizer with a chat template")
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = [render_chat(tokenizer, conv, add_generation_prompt, chat_template) for conv in conversations]
        return self.generate(prompts, sampling_params)

    def _run_to_completion(self, request_ids: list[str]) -> list[RequestOutput]:
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        try:
            while pending:
                for output in self.engine.step(only_finished=True):
                    if output.finished and output.request_id in pending:
                        finished[output.request_id] = output
                        pending.discard(output.request_id)
        finally:
            for request_id in pending:  # interrupted: leave no blocks behind
                self.engine.abort_request(request_id)
            if not self.engine.groups:  # rows launched for requests that already stopped: settle them now
                self.engine.finish_in_flight()
        return [finished[request_id] for request_id in request_ids]


def render_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool, chat_template: str | None) -> str:
    if not messages:
        raise ValueError("messages: at least one message is required")
    for index, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise ValueError(f"messages[{index}]: each message needs 'role' and 'content'")
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, chat_template=chat_template, add_generation_prompt=add_generation_prompt
    )


def normalize_prompts(prompts: PromptInput | Sequence[PromptInput]) -> list[tuple[str | None, list[int] | None]]:
    """(text, token ids) pairs from: a string, token ids, dicts with prompt / prompt_token_ids, or lists."""
    if isinstance(prompts, str | Mapping) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
    ):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts: give at least one prompt")
    return [_one_prompt(p) for p in prompts]


def _one_prompt(prompt: PromptInput) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, Mapping):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return str(prompt["prompt"]), None
        raise ValueError("prompts: a dict prompt needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return None, list(prompt)
    raise ValueError(f"prompts: unsupported prompt type {type(prompt).__name__}")


def normalize_params(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if sampling_params is None:
        return [DEFAULT_SAMPLING_PARAMS] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if len(sampling_params) != count:
        raise ValueError(f"sampling_params: got {len(sampling_params)} for {count} prompts")
    return list(sampling_params)


def normalize_lora_requests(
    lora_request: LoRARequest | Sequence[LoRARequest | None] | None, count: int
) -> list[LoRARequest | None]:
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * count
    requests = list(lora_request)
    if len(requests) != count:
        raise ValueError(f"lora_request: got {len(requests)} for {count} prompts")
    for request in requests:
        if request is not None and not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request: expected LoRARequest or None, got {type(request).__name__}")
    return requests


def validate_engine_args(config: EngineConfig) -> None:
    """Reject impossible settings up front, naming the argument."""
    cache, sched = config.cache, config.scheduler
    if cache.block_size not in (8, 16, 32, 64, 128):
        raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {cache.block_size}")
    if sched.max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {sched.max_num_seqs}")
    if sched.max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be at least 1, got {sched.max_num_batched_tokens}")
    if config.model.max_model_len is not None and config.model.max_model_len < 2:
        raise ValueError(f"max_model_len must be at least 2, got {config.model.max_model_len}")
    if cache.kv_cache_memory is not None and cache.kv_cache_memory < 1:
        raise ValueError(f"kv_cache_memory must be a positive byte count, got {cache.kv_cache_memory}")
    spec = sched.speculative_config
    if spec is not None and spec.method in ("eagle", "eagle3"):
        raise ValueError(
            f"speculative_config.method: {spec.method!r} is not implemented yet (ngram and draft_model are)"
        )
    if config.model.load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {config.model.load_format!r}")
    if config.lora.lora_modules and not config.lora.enable_lora:
        raise ValueError("lora_modules: serving LoRA adapters needs enable_lora=True (--enable-lora)")
    validate_tensor_parallel(config)


def validate_tensor_parallel(config: EngineConfig) -> None:
    """What a tensor-parallel engine cannot do yet is refused here rather than run wrong."""
    size = config.model.tensor_parallel_size
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {size}")
    if size > 1 and config.lora.enable_lora:
        raise ValueError(
            f"enable_lora with tensor_parallel_size {size}: multi-LoRA is not tensor-parallel yet (its GPU slots hold "
            "whole, unsharded projections); use tensor_parallel_size=1"
        )
    spec = config.scheduler.speculative_config
    if size > 1 and spec is not None and spec.method != "ngram":
        raise ValueError(
            f"speculative_config.method {spec.method!r} with tensor_parallel_size {size}: draft models are not "
            "tensor-parallel yet (ngram speculation is)"
        )

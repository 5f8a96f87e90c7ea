"""vLLM's extra HTTP endpoints, so clients and tools written for ``vllm serve`` work against the router unchanged.

- ``POST /tokenize``: ``{"model"?, "prompt", "add_special_tokens"?, "return_token_strs"?}`` or a chat body
  ``{"model"?, "messages", "add_generation_prompt"?, "continue_final_message"?, "chat_template_kwargs"?, "tools"?,
  "add_special_tokens"?, "return_token_strs"?}`` -> ``{"count", "max_model_len", "tokens", "token_strs"}``. A
  chat body is rendered exactly as /v1/chat/completions renders it (same template, same tool prompt).
- ``POST /detokenize``: ``{"model"?, "tokens"}`` -> ``{"prompt"}``.
- ``GET /version``: ``{"version"}`` (Tandem's version).
- ``GET /v1/models/{id}``: the model card (the OpenAI client's ``models.retrieve``); another id is a 404.

Each one asks for the API key when keys are configured (as /v1/* does), and answers bad input with the OpenAI
error envelope.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from jinja2 import TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field

from common.coord.watcher import RegistryWatcher
from common.version import tandem_version
from services.router import protocol
from services.router.admission import AdmissionError
from services.router.openai_api import Gateway, error_status_and_body
from services.router.tool_calls import plan_tools, render_chat


def load_chat_template(value: str) -> str:
    """``--chat-template`` as vLLM reads it: the text of the file it names, else, when it holds a Jinja character
    (``{``, ``}`` or a newline), the template itself with backslash escapes decoded (``\\n`` in a shell flag);
    anything else is a path that could not be opened (ValueError). The text must parse as Jinja (ValueError)."""
    try:
        text = Path(value).read_text(encoding="utf-8")
    except OSError as error:
        if not any(ch in value for ch in "{}\n"):
            raise ValueError(f"--chat-template {value!r} looks like a file path, but it could not be opened: "
                             f"{error.strerror or error}") from None
        text = codecs.decode(value, "unicode_escape")
    try:
        ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(text)
    except TemplateSyntaxError as error:
        raise ValueError(f"--chat-template: not a valid Jinja template (line {error.lineno}: "
                         f"{error.message})") from None
    return text


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenizeCompletionRequest(_Body):
    """vLLM's ``/tokenize`` for a text prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Body):
    """vLLM's ``/tokenize`` for chat messages (the fields a chat completion renders its prompt from)."""

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def served_max_model_len(watcher: RegistryWatcher, model: str) -> Callable[[], int]:
    """The context length the decode pool serves ``model`` with, read from the registry (0 while none is up)."""
    return lambda: max((w.max_model_len for w in watcher.alive(role="decode", model=model)), default=0)


def add_vllm_routes(app: FastAPI, gateway: Gateway, max_model_len: Callable[[], int]) -> None:
    """Register the endpoints on ``app``; ``max_model_len()`` is the served context length (0 = not known yet)."""

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        return await _answer(gateway, request, lambda body: _tokenize(gateway, body, max_model_len()))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        return await _answer(gateway, request, lambda body: _detokenize(gateway, body))

    @app.get("/version")
    async def version(request: Request) -> JSONResponse:
        return await _answer(gateway, request, lambda body: {"version": tandem_version()}, has_body=False)

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
        return await _answer(gateway, request, lambda body: _model_card(gateway, model_id), has_body=False)


async def _answer(gateway: Gateway, request: Request, handle: Callable[[Any], dict], has_body: bool = True
                  ) -> JSONResponse:
    """Authenticate, decode the JSON body (when the endpoint takes one), run ``handle``; errors as OpenAI's."""
    try:
        gateway.keys.check(request.headers.get("authorization"))
        return JSONResponse(handle(await request.body() if has_body else None))
    except (protocol.ProtocolError, AdmissionError) as error:
        status, envelope = error_status_and_body(error)
        gateway.metrics.count_error(status)
        return JSONResponse(envelope, status_code=status)


def _check_model(gateway: Gateway, model: str | None) -> None:
    if model is not None and model != gateway.model_id:
        raise protocol.model_not_found(model)


def _tokenize(gateway: Gateway, body: bytes, max_model_len: int) -> dict:
    data = protocol.decode_body(body)
    is_chat = isinstance(data, dict) and "messages" in data
    parsed = protocol.parse_body(TokenizeChatRequest if is_chat else TokenizeCompletionRequest, data)
    _check_model(gateway, parsed.model)
    text = _chat_prompt(gateway, parsed) if is_chat else parsed.prompt
    tokens = list(gateway.tokenizer.encode(text, add_special_tokens=parsed.add_special_tokens))
    strs = gateway.tokenizer.convert_ids_to_tokens(tokens) if parsed.return_token_strs else None
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": strs}


def _chat_prompt(gateway: Gateway, parsed: TokenizeChatRequest) -> str:
    """The prompt text /v1/chat/completions would build from these messages (tools shown, none parsed)."""
    fields = parsed.model_dump(include={"messages", "add_generation_prompt", "continue_final_message",
                                        "chat_template_kwargs", "tools"}, exclude_none=True)
    if parsed.tools:
        fields["tool_choice"] = "none"
    chat = protocol.parse_chat({"model": gateway.model_id, **fields})
    plan = plan_tools(chat, gateway.tool_calls)
    return render_chat(gateway.tokenizer, chat, plan, gateway.tool_calls.call_format)


def _detokenize(gateway: Gateway, body: bytes) -> dict:
    parsed = protocol.parse_body(DetokenizeRequest, body)
    _check_model(gateway, parsed.model)
    vocab = len(gateway.tokenizer)
    for i, token in enumerate(parsed.tokens):
        if not 0 <= token < vocab:
            raise protocol.ProtocolError(f"tokens[{i}]: token ids must be in [0, {vocab}), got {token}",
                                         param=f"tokens[{i}]")
    return {"prompt": gateway.tokenizer.decode(parsed.tokens)}


def _model_card(gateway: Gateway, model_id: str) -> dict:
    _check_model(gateway, model_id)
    return protocol.model_card(gateway.model_id, gateway.created)

"""The OpenAI wire protocol for the router: request parsing/validation and response building, no I/O.

Requests (``parse_chat``, ``parse_completion``) become pydantic models or raise ``ProtocolError`` (HTTP status,
OpenAI error envelope, ``param`` naming the offending field in OpenAI's ``messages[0].content[1].type`` style).
Responses are plain dicts in the layout of api.openai.com (checked in the tests against the ``openai`` package's
types), so handlers only add transport: ``JSONResponse(chat_completion(...))`` or ``sse(chat_chunk_delta(...))``.

Rules shared by both endpoints:

- A JSON ``null`` means "absent" (the field's default) for every top-level field except ``max_tokens``, where it
  means "up to the context" as in vLLM.
- An unknown field is a 400 ("Unrecognized request argument supplied: foo", as OpenAI says); a known OpenAI field
  we cannot honour (``functions``, ``audio``, ...) is a 400 "<field> is not supported yet", unless its value
  is the no-op one (``function_call: "none"``, ``modalities: ["text"]``,
  ``service_tier: "auto"``, ``store: false``, ...), which is accepted and dropped.
- Types are strict (no "3" for 3, no 1 for true); ranges follow OpenAI where it is stricter than vLLM
  (temperature <= 2, n <= 128) and vLLM for its extras (top_k, min_p, repetition_penalty, min_tokens, ...).
- Structured output: ``response_format`` (json_object, json_schema), vLLM's ``structured_outputs`` and its older
  ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` all become the one
  ``SamplingParams.structured_outputs``; more than one of them is a 400 naming both. Whether a schema, regex or
  grammar compiles is the engine's to say (a worker's INVALID_ARGUMENT, a 400 naming the problem).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from common.engine.outputs import Logprob
from common.engine.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputs

# -- constants ---------------------------------------------------------------------------------------------

MAX_N = 128
MAX_STOP = 16
MAX_TOP_LOGPROBS = MAX_LOGPROBS
MIN_LOGPROB = -9999.0
"""Stand-in for -inf, which JSON cannot carry (OpenAI's and vLLM's choice)."""

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FINISH_REASONS = ("stop", "length", "tool_calls")
CHAT_OBJECT, CHAT_CHUNK_OBJECT, COMPLETION_OBJECT = "chat.completion", "chat.completion.chunk", "text_completion"
OWNED_BY = "tandem"
DONE = b"data: [DONE]\n\n"
INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."
UNAVAILABLE_RETRY_AFTER_S = 1

ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "service_unavailable"),
}
"""HTTP status -> (error type, default code), as api.openai.com answers (not vLLM's "BadRequestError"/int codes).

OpenAI reports bad keys and unknown models as ``invalid_request_error`` with codes ``invalid_api_key`` /
``model_not_found``, rate limits as type ``requests`` (or ``tokens``) with ``rate_limit_exceeded``, and its own
failures as ``server_error``. Clients (the ``openai`` package included) branch on the HTTP status, not on these.
"""

# Known OpenAI fields we do not implement: name -> the values that are a no-op (accepted and dropped).
_Accepts = Callable[[Any], bool]
_NONE: _Accepts = lambda value: value is None
_CHAT_UNSUPPORTED: dict[str, _Accepts] = {
    "functions": _NONE,
    "function_call": lambda value: value in (None, "none"),
    "audio": _NONE,
    "modalities": lambda value: value is None or value == ["text"],
    "prediction": _NONE,
    "web_search_options": _NONE,
    "service_tier": lambda value: value in (None, "auto", "default"),
    "store": lambda value: value in (None, False),
    "reasoning_effort": _NONE,
    "verbosity": _NONE,
    "moderation": _NONE,
    "prompt_cache_retention": _NONE,
    "prompt_cache_options": _NONE,
}
_COMPLETION_UNSUPPORTED: dict[str, _Accepts] = {
    "suffix": lambda value: value in (None, ""),
    "service_tier": _CHAT_UNSUPPORTED["service_tier"],
}
_MESSAGE_UNSUPPORTED: dict[str, _Accepts] = {
    "function_call": _NONE,
    "audio": _NONE,
}
_NULL_MEANS_NULL = frozenset({"max_tokens"})
_CONTENT_PART_KEYS = frozenset({"type", "text"})


# -- errors ------------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """A request the router refuses. Invariant: ``message`` is one line, safe to show the client."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code

    def body(self) -> dict:
        """The OpenAI error envelope for this error."""
        return error_for_status(self.status, self.message, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error envelope ``{"error": {"message", "type", "param", "code"}}``, taken as given."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_for_status(
    status: int, message: str | None = None, param: str | None = None, code: str | None = None
) -> dict:
    """The envelope for an HTTP status, with ``ERROR_TYPES``' type and default code.

    Invariants: a 500 always carries ``INTERNAL_ERROR_MESSAGE`` (whatever was passed, so no exception text or
    traceback leaks); other messages are cut to their first line. Unlisted statuses map to
    ``invalid_request_error`` (4xx) or ``server_error`` (5xx).
    """
    kind, default_code = ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    first_line = (message or "").strip().split("\n", 1)[0].strip()
    if status == 500 or not first_line:
        first_line = INTERNAL_ERROR_MESSAGE if status >= 500 else "Invalid request."
    return error_body(first_line, kind, param, code if code is not None else default_code)


def retry_after_headers(status: int) -> dict[str, str]:
    """``Retry-After`` for a 503: a worker joining or Redis coming back is seen within about a heartbeat."""
    return {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)} if status == 503 else {}


def model_not_found(model: str) -> ProtocolError:
    """OpenAI's 404 for a model this router does not serve."""
    message = f"The model `{model}` does not exist or you do not have access to it."
    return ProtocolError(message, param="model", status=404, code="model_not_found")


def context_length_error(max_model_len: int, prompt_tokens: int, param: str = "messages") -> ProtocolError:
    """OpenAI's 400 for a prompt that does not fit the model (``code="context_length_exceeded"``)."""
    message = (
        f"This model's maximum context length is {max_model_len} tokens. However, your {param} resulted in "
        f"{prompt_tokens} tokens. Please reduce the length of the {param}."
    )
    return ProtocolError(message, param=param, code="context_length_exceeded")


def completion_too_long_error(
    max_model_len: int, prompt_tokens: int, max_tokens: int, prompt_param: str, param: str
) -> ProtocolError:
    """OpenAI's 400 for a prompt plus an explicit ``max_tokens`` past the context (``code="context_length_exceeded"``,
    ``param`` the max tokens field given)."""
    message = (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {prompt_param}, {max_tokens} in the completion). "
        f"Please reduce the length of the {prompt_param} or completion."
    )
    return ProtocolError(message, param=param, code="context_length_exceeded")


def text_too_long_error(max_model_len: int, chars: int, param: str) -> ProtocolError:
    """The context-length 400 for a text refused before it is tokenized: more characters than ``max_model_len``
    tokens can stand for."""
    message = (
        f"This model's maximum context length is {max_model_len} tokens. However, your {param} has {chars} "
        f"characters, more than {max_model_len} tokens can hold. Please reduce the length of the {param}."
    )
    return ProtocolError(message, param=param, code="context_length_exceeded")


# -- request models ----------------------------------------------------------------------------------------

SAMPLING_FIELDS = tuple(field.name for field in dataclasses.fields(SamplingParams))
"""SamplingParams' fields, the one sampling schema that the request models below map onto."""

ENDPOINT_MAPPED_SAMPLING = frozenset({"max_tokens", "logprobs", "prompt_logprobs", "structured_outputs"})
"""SamplingParams fields whose OpenAI spelling or default differs per endpoint, or that several request fields
spell (structured_outputs); ``sampling_params`` and ``_engine_fields`` map them."""

CHAT_UNEXPOSED_SAMPLING: Mapping[str, str] = {}
"""SamplingParams fields that /v1/chat/completions intentionally does not expose, and why."""

GENERATE_UNEXPOSED_SAMPLING: Mapping[str, str] = {
    "n": "/generate answers one sequence per request; /v1/completions serves n > 1",
    "prompt_logprobs": "/generate's events carry generated tokens only; /v1/completions and /v1/chat/completions "
                       "return prompt logprobs (prompt_logprobs, or echo with logprobs)",
}
"""SamplingParams fields that ``POST /generate`` intentionally does not accept, and why."""


@functools.cache
def _shared_sampling_names(model: type[BaseModel]) -> tuple[str, ...]:
    """The SamplingParams fields ``model`` declares under the same name, minus the endpoint-mapped ones."""
    return tuple(
        name for name in SAMPLING_FIELDS if name in model.model_fields and name not in ENDPOINT_MAPPED_SAMPLING
    )



def _stop_list(value: Any) -> Any:
    """OpenAI's ``stop`` is a string or a list of strings; keep one shape (a list)."""
    return [value] if isinstance(value, str) else value


def _check_logit_bias_keys(bias: dict[str, float] | None) -> dict[str, float] | None:
    for key in bias or {}:
        if not key.isdigit():
            raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
    return bias


def _prompt_list(value: Any) -> list[str | list[int]]:
    """Normalize the four OpenAI prompt shapes into one list of prompts (text or token ids).

    Raises ValueError (surfacing as a 400 on ``prompt``) for an empty prompt, an empty list or element, negative
    or non-int ids (booleans included), and mixed lists.
    """
    shape = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(value, str):
        value = [value] if value else []
    elif not isinstance(value, list):
        raise ValueError(shape)
    if not value:
        raise ValueError("must not be empty")
    if all(_is_token_id(item) for item in value):
        return [list(value)]
    if all(isinstance(item, str) for item in value) or all(isinstance(item, list) for item in value):
        for item in value:
            if not item:
                raise ValueError("must not contain an empty prompt")
            if isinstance(item, list) and not all(_is_token_id(token) for token in item):
                raise ValueError("token ids must be non-negative integers")
        return list(value)
    raise ValueError(shape)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _drop_nulls(data: dict) -> dict:
    """``null`` means absent, except for the fields in ``_NULL_MEANS_NULL``."""
    return {key: value for key, value in data.items() if value is not None or key in _NULL_MEANS_NULL}


def _drop_unsupported(data: dict, table: Mapping[str, _Accepts], prefix: str = "") -> dict:
    """Remove no-op values of known-unsupported fields; raise ProtocolError naming the first real one."""
    for name, accepts in table.items():
        if name in data:
            if not accepts(data[name]):
                raise ProtocolError(f"{prefix}{name} is not supported yet", param=f"{prefix}{name}")
            data = {key: value for key, value in data.items() if key != name}
    return data


def _require_object(data: Any) -> dict:
    if not isinstance(data, dict):
        raise ProtocolError("The request body must be a JSON object.")
    return data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    """A ``{"type": "text", "text": ...}`` content part, the only kind supported."""

    type: Literal["text"]
    text: str


class StreamOptions(_Strict):
    """``stream_options``; ``include_obfuscation`` is accepted and ignored (we add no padding)."""

    include_usage: bool = False
    include_obfuscation: bool | None = None


TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
"""OpenAI's rule for function names (also what the prompt and the parsers may rely on: no quotes, no spaces)."""


def _object_schema(schema: dict[str, Any] | None) -> dict[str, Any]:
    """A function's ``parameters``: a JSON schema for an object (absent: one that takes no arguments)."""
    if schema is None:
        return {"type": "object", "properties": {}}
    kind = schema.get("type", "object")
    if kind != "object":
        raise ValueError(f"must be a JSON schema of type 'object', got type {json.dumps(kind)}")
    return schema


class FunctionDefinition(_Strict):
    """A tool's function. Invariant: ``parameters`` is an object schema (``{"type": "object", "properties": {}}``
    when the client gave none)."""

    name: Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]
    description: str | None = None
    parameters: Annotated[dict[str, Any] | None, AfterValidator(_object_schema)] = Field(None, validate_default=True)
    strict: bool | None = None


class Tool(_Strict):
    """One entry of ``tools``: ``{"type": "function", "function": {...}}``."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: the model must call that function."""

    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Strict):
    """A call the assistant made: the function's name and its arguments as JSON text (as the model wrote them)."""

    name: str
    arguments: str


def _tool_choice(value: Any) -> Any:
    """One readable error for a bad tool_choice (not one per member of the union)."""
    if isinstance(value, dict):
        try:
            return NamedToolChoice.model_validate(value)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            raise ValueError(f"{_path(first['loc'])}: {first['msg']}") from None
    if value not in ("none", "auto", "required"):
        raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
    return value


class MessageToolCall(_Strict):
    """An entry of an assistant message's ``tool_calls`` in a follow-up request."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One chat message. Invariants (checked by the request): only assistant messages may lack content, and only
    they carry ``tool_calls``; a ``tool`` message names the call it answers (``tool_call_id``)."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    tool_calls: list[MessageToolCall] | None = None

    @property
    def text(self) -> str:
        """The content as one string: text parts joined with newlines, None as ''."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


StopList = Annotated[list[str] | None, BeforeValidator(_stop_list), Field(max_length=MAX_STOP)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None, AfterValidator(_check_logit_bias_keys)
]


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: OpenAI's named schema (``strict`` is accepted: output always follows it)."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``response_format``: text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self


JsonSchema = dict[str, Any] | str
"""A JSON schema as an object, or as its JSON text (vLLM takes both)."""


class StructuredOutputsField(_Strict):
    """vLLM's ``structured_outputs`` extra: exactly one of its constraints."""

    json_: JsonSchema | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None

    def constraint(self) -> StructuredOutputs:
        schema = None if self.json_ is None else _schema_text(self.json_, "structured_outputs.json")
        choice = None if self.choice is None else tuple(self.choice)
        return _structured(
            "structured_outputs",
            json=schema,
            json_object=bool(self.json_object),
            regex=self.regex,
            choice=choice,
            grammar=self.grammar,
        )


def _schema_text(schema: JsonSchema, param: str) -> str:
    """The schema as JSON text; text that is not JSON is a 400 here (its meaning is the engine's to check)."""
    if isinstance(schema, dict):
        return json.dumps(schema)
    try:
        json.loads(schema)
    except ValueError as error:
        raise ProtocolError(f"{param}: the JSON schema is not valid JSON ({error})", param=param) from None
    return schema


def _structured(param: str, **fields: Any) -> StructuredOutputs:
    """StructuredOutputs(**fields), its ValueError a 400 on ``param`` (two kinds in one structured_outputs)."""
    try:
        return StructuredOutputs(**fields)
    except ValueError as error:
        message = str(error)
        raise ProtocolError(message if message.startswith(param) else f"{param}: {message}", param=param) from None


def _only_default_priority(priority: int) -> int:
    """vLLM's answer under its default (first come, first served) scheduling, which is the only one Tandem has."""
    if priority != 0:
        raise ValueError(f"Got priority {priority} but priority scheduling is not enabled (requests are served "
                         "first come, first served; only priority 0 is accepted)")
    return priority


RequestId = Annotated[str, Field(pattern=r"^[!-~]{1,256}$")]
"""A client's request id (vLLM's ``request_id``): 1 to 256 printable ASCII characters, no spaces."""


class _SamplingRequest(_Strict):
    """Fields both endpoints share: OpenAI's sampling fields plus vLLM's extras."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: StopList = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the response's ``prompt_logprobs``
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    request_id: RequestId | None = None  # the response's id (``chatcmpl-<id>``), as vLLM; X-Request-Id wins
    priority: Annotated[int, AfterValidator(_only_default_priority)] = 0
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: JsonSchema | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    def structured_output_constraints(self) -> list[tuple[str, StructuredOutputs]]:
        """Each constraint the request asks for, with the field that asked (at most one is allowed)."""
        found = []
        if self.response_format is not None and self.response_format.type != "text":
            found.append(("response_format", _response_format_constraint(self.response_format)))
        if self.structured_outputs is not None:
            found.append(("structured_outputs", self.structured_outputs.constraint()))
        guided = {
            "guided_json": lambda value: {"json": _schema_text(value, "guided_json")},
            "guided_regex": lambda value: {"regex": value},
            "guided_choice": lambda value: {"choice": tuple(value)},
            "guided_grammar": lambda value: {"grammar": value},
        }
        for param, fields in guided.items():
            value = getattr(self, param)
            if value is not None:
                found.append((param, _structured(param, **fields(value))))
        return found

    def requested_structured_outputs(self) -> StructuredOutputs | None:
        """The request's one structured-output constraint (None: unconstrained); two at once is a 400."""
        found = self.structured_output_constraints()
        if len(found) > 1:
            first, second = found[0][0], found[1][0]
            raise ProtocolError(
                f"{second}: {first} and {second} cannot be combined; give one structured-output constraint",
                param=second,
            )
        return found[0][1] if found else None

    @property
    def include_usage(self) -> bool:
        """True when a streamed response must end with a usage chunk (and carry ``usage: null`` before)."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ProtocolError(
                "stream_options: Stream options can only be defined when `stream=True`.", param="stream_options"
            )
        if self.stream and self.prompt_logprobs:  # as vLLM: its stream chunks have no place for them
            raise ProtocolError("prompt_logprobs: `prompt_logprobs` are not available when `stream=True`.",
                                param="prompt_logprobs")

    def _engine_fields(self, max_tokens: int | None) -> dict[str, Any]:
        """SamplingParams keyword arguments common to both endpoints: every field this request model declares
        under SamplingParams' own name, except the ones each endpoint maps itself (``ENDPOINT_MAPPED_SAMPLING``)."""
        fields = {name: getattr(self, name) for name in _shared_sampling_names(type(self))}
        fields["max_tokens"] = max_tokens
        fields["structured_outputs"] = self.requested_structured_outputs()
        return fields


def _response_format_constraint(response_format: ResponseFormat) -> StructuredOutputs:
    """json_object: any JSON object; json_schema: its schema (none given: any JSON object, as json_object)."""
    schema = response_format.json_schema.schema_ if response_format.json_schema is not None else None
    if response_format.type == "json_object" or schema is None:
        return StructuredOutputs(json_object=True)
    return StructuredOutputs(json=json.dumps(schema))


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``. Invariants after validation: messages is non-empty; every non-assistant
    message has content and no content list is empty; ``top_logprobs > 0`` implies ``logprobs``;
    ``stream_options`` implies ``stream``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Annotated[Literal["none", "auto", "required"] | NamedToolChoice | None,
                           BeforeValidator(_tool_choice)] = None
    parallel_tool_calls: bool = True
    # vLLM's prompt-rendering extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _screen(cls, data: Any) -> Any:
        data = _drop_unsupported(_drop_nulls(_require_object(data)), _CHAT_UNSUPPORTED)
        if isinstance(data.get("messages"), list):
            data["messages"] = [_screen_message(i, message) for i, message in enumerate(data["messages"])]
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> ChatCompletionRequest:
        for i, message in enumerate(self.messages):
            if message.content is None and message.role != "assistant":
                raise ProtocolError(
                    f"messages[{i}].content: Field required for role '{message.role}'", param=f"messages[{i}].content"
                )
            if isinstance(message.content, list) and not message.content:
                raise ProtocolError(
                    f"messages[{i}].content: List should have at least 1 item", param=f"messages[{i}].content"
                )
            _check_message_tool_fields(i, message)
        _check_tools(self.tools or [], self.tool_choice)
        _check_rendering(self)
        if self.top_logprobs and not self.logprobs:
            raise ProtocolError(
                "top_logprobs: when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs"
            )
        self._check_stream_options()
        return self

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """``tool_choice`` as OpenAI defaults it: "auto" when tools are given, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` if given, else ``max_tokens`` (OpenAI deprecated the latter), else None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, default_max_tokens: int | None = None) -> SamplingParams:
        """The engine's settings. No max tokens in the request -> ``default_max_tokens`` (None: up to the context).

        ``logprobs: true`` asks the engine for ``top_logprobs`` alternatives (0 when absent: the chosen token only).
        """
        max_tokens = self.requested_max_tokens if self.requested_max_tokens is not None else default_max_tokens
        fields = self._engine_fields(max_tokens)
        fields["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        fields["prompt_logprobs"] = self.prompt_logprobs
        max_name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return _build_params(fields, {"max_tokens": max_name, "logprobs": "top_logprobs"})


def _check_message_tool_fields(i: int, message: ChatMessage) -> None:
    if message.tool_calls and message.role != "assistant":
        raise ProtocolError(f"messages[{i}].tool_calls: only assistant messages may carry tool calls",
                            param=f"messages[{i}].tool_calls")
    if message.role == "tool" and message.tool_call_id is None:
        raise ProtocolError(f"messages[{i}].tool_call_id: Field required for role 'tool'",
                            param=f"messages[{i}].tool_call_id")


RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template",
                                      "add_generation_prompt", "continue_final_message", "tokenize", "padding",
                                      "truncation", "max_length", "return_tensors", "return_dict",
                                      "return_assistant_tokens_mask", "tokenizer_kwargs"})
"""``apply_chat_template`` arguments the router sets itself; ``chat_template_kwargs`` may not override them."""


def _check_rendering(request: ChatCompletionRequest) -> None:
    """vLLM's rules: continuing the final message excludes a generation prompt, and that message is the
    assistant's; template kwargs are the template's own variables, not apply_chat_template's arguments."""
    if request.continue_final_message:
        if request.add_generation_prompt:
            raise ProtocolError("continue_final_message: Cannot set both `continue_final_message` and "
                                "`add_generation_prompt` to True.", param="continue_final_message")
        if request.messages[-1].role != "assistant":
            raise ProtocolError("continue_final_message: the last message must be the assistant's to continue it",
                                param="continue_final_message")
    clash = sorted(RESERVED_TEMPLATE_KWARGS & set(request.chat_template_kwargs or {}))
    if clash:
        raise ProtocolError(f"chat_template_kwargs.{clash[0]}: set by the router; use the request field instead",
                            param=f"chat_template_kwargs.{clash[0]}")


def _check_tools(tools: Sequence[Tool], choice: str | NamedToolChoice | None) -> None:
    """Tool names are unique; a tool_choice other than "none" needs tools; a named choice names one of them."""
    names = [tool.function.name for tool in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ProtocolError(f"tools[{i}].function.name: duplicate function name '{name}'",
                                param=f"tools[{i}].function.name")
    if choice not in (None, "none") and not tools:
        raise ProtocolError("tool_choice: 'tool_choice' is only allowed when 'tools' are specified.",
                            param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ProtocolError(f"tool_choice: function '{choice.function.name}' is not among the tools",
                            param="tool_choice")


def _screen_message(i: int, message: Any) -> Any:
    """Reject unsupported message fields and content parts with OpenAI-style paths; leave typing to pydantic."""
    if not isinstance(message, dict):
        return message
    message = _drop_unsupported(message, _MESSAGE_UNSUPPORTED, prefix=f"messages[{i}].")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return message
    path = f"messages[{i}].content"
    if not isinstance(content, list):
        raise ProtocolError(f"{path}: Input should be a string or a list of content parts", param=path)
    for j, part in enumerate(content):
        _screen_part(f"{path}[{j}]", part)
    return message


def _screen_part(path: str, part: Any) -> None:
    if not isinstance(part, dict):
        raise ProtocolError(f"{path}: Input should be an object", param=path)
    kind = part.get("type")
    if kind != "text":
        shown = kind if isinstance(kind, str) else json.dumps(kind)
        raise ProtocolError(f"{path}.type: content parts of type {shown} are not supported yet", param=f"{path}.type")
    if not isinstance(part.get("text"), str):
        raise ProtocolError(f"{path}.text: Input should be a valid string", param=f"{path}.text")
    extra = sorted(set(part) - _CONTENT_PART_KEYS)
    if extra:
        raise ProtocolError(f"Unrecognized request argument supplied: {path}.{extra[0]}", param=f"{path}.{extra[0]}")


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions`` (legacy). Invariants after validation: ``prompt`` is a non-empty list of non-empty
    prompts, all text or all token ids; ``best_of`` (if given) equals ``n``; ``stream_options`` implies ``stream``;
    ``max_tokens`` 0 only with ``echo`` (the prompt alone is the answer, as vLLM serves lm-evaluation-harness).
    """

    prompt: Annotated[list[str | list[int]], BeforeValidator(_prompt_list)]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _screen(cls, data: Any) -> Any:
        return _drop_unsupported(_drop_nulls(_require_object(data)), _COMPLETION_UNSUPPORTED)

    @model_validator(mode="after")
    def _cross_checks(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ProtocolError("best_of: best_of must be greater than or equal to n", param="best_of")
        if self.best_of is not None and self.best_of > self.n:
            raise ProtocolError("best_of greater than n is not supported yet", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ProtocolError("max_tokens: Input should be greater than or equal to 1 (0 only with echo)",
                                param="max_tokens")
        self._check_stream_options()
        return self

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens: 0``: the engine samples one token (its prefill yields it anyway) and the
        answer drops it, so only the prompt (and its logprobs) comes back."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self, default_max_tokens: int | None = None) -> SamplingParams:
        """The engine's settings. ``max_tokens`` absent -> 16 (OpenAI); ``null`` -> ``default_max_tokens``.

        ``logprobs=k`` asks for k alternatives per generated token, and with ``echo`` per prompt token too (vLLM's
        ``prompt_logprobs``, when given, sets the prompt's count instead).
        """
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        fields = self._engine_fields(1 if self.echo_only else max_tokens)
        fields["logprobs"] = self.logprobs
        fields["prompt_logprobs"] = self.prompt_logprobs
        if self.prompt_logprobs is None and self.echo:
            fields["prompt_logprobs"] = self.logprobs
        renames = {} if self.prompt_logprobs is not None else {"prompt_logprobs": "logprobs"}
        return _build_params(fields, renames)


class _GenerateRequest(BaseModel):
    """``POST /generate``: a prompt (text or token ids), ``stream``, and SamplingParams' fields under their own
    names and defaults (``GenerateBody`` adds them; lax types, as the engine's ``LLM`` API takes them)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    stream: bool = False

    def sampling_params(self) -> SamplingParams:
        """The engine's settings; an out-of-range field is a ProtocolError (400) naming it."""
        fields = self.model_dump(exclude={"prompt", "prompt_token_ids", "stream", "structured_outputs"})
        constraint = getattr(self, "structured_outputs", None)
        fields["structured_outputs"] = constraint.constraint() if constraint is not None else None
        return _build_params(fields, {})


def _generate_body_model() -> type[_GenerateRequest]:
    """``_GenerateRequest`` plus every SamplingParams field but ``GENERATE_UNEXPOSED_SAMPLING``'s, generated from
    the dataclass (type hints and defaults), so /generate cannot drift from the engine's schema. Its
    ``structured_outputs`` takes the JSON shape the OpenAI endpoints take (a schema as an object or as text)."""
    hints = typing.get_type_hints(SamplingParams)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(SamplingParams):
        if field.name in GENERATE_UNEXPOSED_SAMPLING:
            continue
        if field.name == "structured_outputs":
            fields[field.name] = (StructuredOutputsField | None, None)
        elif field.default is dataclasses.MISSING:
            fields[field.name] = (hints[field.name], Field(default_factory=field.default_factory))
        else:
            fields[field.name] = (hints[field.name], field.default)
    return create_model("GenerateBody", __base__=_GenerateRequest, __doc__=_GenerateRequest.__doc__, **fields)


GenerateBody = _generate_body_model()


def _build_params(fields: dict[str, Any], renames: Mapping[str, str]) -> SamplingParams:
    """SamplingParams(**fields), its ValueError (whose first word names the field) turned into a ProtocolError."""
    try:
        return SamplingParams(**fields)
    except ValueError as error:
        message = str(error)
        first = message.split(" ", 1)[0]
        param = renames.get(first, first) if first in fields else None
        if param is not None and param != first:
            message = f"{param}: {message}"
        raise ProtocolError(message, param=param) from None


# -- parsing -----------------------------------------------------------------------------------------------


def parse_chat(body: bytes | str | Mapping[str, Any]) -> ChatCompletionRequest:
    """Decode and validate a chat completions body; every failure is a ProtocolError (400)."""
    return _parse(ChatCompletionRequest, body)


def parse_completion(body: bytes | str | Mapping[str, Any]) -> CompletionRequest:
    """Decode and validate a completions body; every failure is a ProtocolError (400)."""
    return _parse(CompletionRequest, body)


def parse_generate(body: bytes | str | Mapping[str, Any]) -> _GenerateRequest:
    """Decode and validate a ``POST /generate`` body (a ``GenerateBody``); every failure is a ProtocolError (400)."""
    return _parse(GenerateBody, body)


def decode_body(body: bytes | str) -> Any:
    """A request body's JSON (any shape); text that is not JSON is a ProtocolError (400)."""
    return _decode_json(body)


def parse_body(model: type[BaseModel], body: bytes | str | Mapping[str, Any]) -> Any:
    """Decode and validate a body against any strict request model (services.router.vllm_api's, for one)."""
    if not isinstance(body, bytes | bytearray | str | Mapping):
        raise ProtocolError("The request body must be a JSON object.")
    return _parse(model, body)


def _parse(model: type[BaseModel], body: bytes | str | Mapping[str, Any]) -> Any:
    data = _decode_json(body) if isinstance(body, bytes | bytearray | str) else body
    _reject_lone_surrogates(data)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _protocol_error(error) from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _decode_json(body: bytes | bytearray | str) -> Any:
    """JSON (UTF-8, no NaN/Infinity) or a ProtocolError worded like OpenAI's."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError(
            "We could not parse the JSON body of your request. The API expects a JSON payload, "
            "but what was sent was not valid JSON."
        ) from None


def _reject_lone_surrogates(data: Any, loc: tuple[str | int, ...] = ()) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"); such text cannot be encoded, tokenized or detokenized,
    so it is the client's error (400, naming where it is), never a 500 further in."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as error:
            path = _path(loc)
            raise ProtocolError(f"{path}: contains a lone UTF-16 surrogate "
                                f"({data[error.start]!r}); text must be valid Unicode", param=path or None) from None
    elif isinstance(data, Mapping):
        for key, value in data.items():
            _reject_lone_surrogates(key, loc)
            _reject_lone_surrogates(value, (*loc, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            _reject_lone_surrogates(value, (*loc, index))


def _protocol_error(error: ValidationError) -> ProtocolError:
    """The first error (an unknown field before anything else), as ``"<path>: <message>"`` with param=path."""
    errors = error.errors(include_url=False)
    first = next((item for item in errors if item["type"] == "extra_forbidden"), errors[0])
    path = _path(first["loc"])
    if first["type"] == "extra_forbidden":
        return ProtocolError(f"Unrecognized request argument supplied: {path}", param=path)
    message = first["msg"].removeprefix("Value error, ")
    return ProtocolError(f"{path}: {message}" if path else message, param=path or None)


def _path(loc: Iterable[str | int]) -> str:
    """pydantic's ``("messages", 0, "role")`` as OpenAI's ``messages[0].role``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def prompts_of(request: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts, each text or token ids (non-empty, in request order)."""
    return [list(prompt) if isinstance(prompt, list) else prompt for prompt in request.prompt]


def messages_for_template(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages for ``tokenizer.apply_chat_template``: content as one string (text parts joined with "\\n",
    None as ""), ``developer`` mapped to ``system``; ``name`` and ``tool_call_id`` kept when given."""
    out = []
    for message in request.messages:
        item = {"role": "system" if message.role == "developer" else message.role, "content": message.text}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            item["tool_calls"] = [_template_tool_call(call) for call in message.tool_calls]
        out.append(item)
    return out


def _template_tool_call(call: MessageToolCall) -> dict:
    """A call as HF chat templates take it: ``arguments`` as a dict (templates ``tojson`` it), as vLLM passes them;
    arguments that are not a JSON object stay text."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    function = {"name": call.function.name, "arguments": arguments if isinstance(arguments, dict) else
                call.function.arguments}
    return {"id": call.id, "type": "function", "function": function}


# -- response inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopLogprob:
    """One alternative at a position. ``bytes`` None -> the UTF-8 encoding of ``token``."""

    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token at a position and its top alternatives (best first, the chosen one among them or not).

    ``logprob`` is None only for the first prompt token of an echoed completion (nothing precedes it).
    """

    token_id: int
    token: str
    logprob: float | None
    top: tuple[TopLogprob, ...] = ()
    bytes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made. Invariant: ``id`` is unique in its response (``call_<24 hex>``)."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=lambda: new_tool_call_id())

    def wire(self) -> dict:
        """The ``message.tool_calls[i]`` object."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ChoiceResult:
    """One finished choice. Invariants: ``finish_reason`` is in FINISH_REASONS (an aborted request has no choice);
    ``text`` is None only for a chat message that has ``tool_calls``."""

    index: int
    text: str | None
    finish_reason: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it (None: EOS, length)
    prompt_logprobs: Sequence[Mapping[int, Logprob] | None] | None = None  # asked for: vLLM's, decoded_token filled

    def __post_init__(self) -> None:
        _check_finish_reason(self.finish_reason)


def _check_finish_reason(reason: str | None) -> None:
    if reason is not None and reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {reason!r}")


def token_logprob(
    token_id: int, entry: Mapping[int, Logprob] | None, decode: Callable[[int], str], num_top: int
) -> TokenLogprob:
    """A TokenLogprob from the engine's per-position dict (chosen token plus ranked alternatives).

    ``entry`` None (the first prompt position) gives ``logprob=None``. ``top`` keeps the ``num_top`` entries of
    rank 1..num_top in rank order, the chosen token included when it ranks that high.
    """
    if entry is None:
        return TokenLogprob(token_id, decode(token_id), None)
    ranked = sorted(
        (item for item in entry.items() if item[1].rank is not None and item[1].rank <= num_top),
        key=lambda item: item[1].rank,
    )
    top = tuple(TopLogprob(decode(tid), lp.logprob) for tid, lp in ranked[:num_top])
    return TokenLogprob(token_id, decode(token_id), entry[token_id].logprob, top)


# -- response builders -------------------------------------------------------------------------------------


def new_id(kind: Literal["chat", "completion"], client_id: str | None = None) -> str:
    """The response id: ``chatcmpl-<client_id>`` / ``cmpl-<client_id>`` when the client named the request (vLLM's
    ``request_id`` or X-Request-Id), else a fresh one with 32 hex digits."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + (client_id or uuid.uuid4().hex)


def new_tool_call_id() -> str:
    """A fresh tool call id: ``call_<24 hex>``."""
    return "call_" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` only when ``cached_tokens`` is given."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def _clamp(logprob: float) -> float:
    return MIN_LOGPROB if math.isnan(logprob) else max(float(logprob), MIN_LOGPROB)


def _utf8(token: str, given: tuple[int, ...] | None) -> list[int]:
    return list(given) if given is not None else list(token.encode("utf-8", errors="replace"))


def _chat_logprobs(entries: Sequence[TokenLogprob] | None) -> dict | None:
    """Chat layout ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""
    if entries is None:
        return None
    content = []
    for entry in entries:
        if entry.logprob is None:
            raise ValueError("chat logprobs need a logprob for every token")
        top = [{"token": t.token, "logprob": _clamp(t.logprob), "bytes": _utf8(t.token, t.bytes)} for t in entry.top]
        content.append(
            {
                "token": entry.token,
                "logprob": _clamp(entry.logprob),
                "bytes": _utf8(entry.token, entry.bytes),
                "top_logprobs": top,
            }
        )
    return {"content": content}


def _legacy_logprobs(entries: Sequence[TokenLogprob] | None, text_offset: int = 0) -> dict | None:
    """Completions layout, as vLLM builds it: ``text_offset`` counts characters of the token strings from
    ``text_offset``; ``top_logprobs[i]`` maps the chosen token and then the alternatives to logprobs (up to k+1
    entries; the first text wins on a clash); a position without a logprob has None in both lists."""
    if entries is None:
        return None
    offsets, token_logprobs, tokens, tops = [], [], [], []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
        tokens.append(entry.token)
        if entry.logprob is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(_clamp(entry.logprob))
        top = {entry.token: _clamp(entry.logprob)}
        for alternative in entry.top:
            top.setdefault(alternative.token, _clamp(alternative.logprob))
        tops.append(top)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": tops}


def prompt_logprobs_json(entries: Sequence[Mapping[int, Logprob] | None]) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: ``null`` for the first prompt token, then per position ``{"<token id>": {"logprob",
    "rank", "decoded_token"}}`` holding the prompt token (first) and its top alternatives; -inf as -9999.0."""
    return [
        None if entry is None else {
            str(token_id): {"logprob": _clamp(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for token_id, lp in entry.items()
        }
        for entry in entries
    ]


def _envelope(request_id: str, kind: str, model: str, created: int, choices: list[dict]) -> dict:
    return {
        "id": request_id,
        "object": kind,
        "created": int(created),
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }


def chat_completion(request_id: str, model: str, created: int, choices: Sequence[ChoiceResult], usage: dict) -> dict:
    """A whole ``chat.completion`` object (choices in the given order); vLLM's top-level ``prompt_logprobs`` when
    they were asked for (one prompt: every choice has the same)."""
    body = _envelope(
        request_id,
        CHAT_OBJECT,
        model,
        created,
        [
            {
                "index": choice.index,
                "message": _chat_message(choice),
                "logprobs": _chat_logprobs(choice.logprobs),
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
            for choice in choices
        ],
    )
    body["usage"] = usage
    asked = next((choice.prompt_logprobs for choice in choices if choice.prompt_logprobs is not None), None)
    if asked is not None:
        body["prompt_logprobs"] = prompt_logprobs_json(asked)
    return body


def _chat_message(choice: ChoiceResult) -> dict:
    """The assistant message; ``tool_calls`` only when the model made calls (as api.openai.com sends it)."""
    message = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.tool_calls:
        message["tool_calls"] = [call.wire() for call in choice.tool_calls]
    return message


def completion(request_id: str, model: str, created: int, choices: Sequence[ChoiceResult], usage: dict) -> dict:
    """A whole ``text_completion`` object. With echo, ``text`` and ``logprobs`` already include the prompt; each
    choice carries vLLM's ``prompt_logprobs`` when they were asked for (``prompt_logprobs``, or echo with logprobs)."""
    body = _envelope(request_id, COMPLETION_OBJECT, model, created, [_completion_choice(c) for c in choices])
    body["usage"] = usage
    return body


def _completion_choice(choice: ChoiceResult) -> dict:
    out = {
        "index": choice.index,
        "text": choice.text,
        "logprobs": _legacy_logprobs(choice.logprobs),
        "finish_reason": choice.finish_reason,
        "stop_reason": choice.stop_reason,
    }
    if choice.prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprobs_json(choice.prompt_logprobs)
    return out


def _with_usage_null(body: dict, include_usage: bool) -> dict:
    """With ``stream_options.include_usage`` OpenAI puts ``"usage": null`` on every chunk but the last."""
    if include_usage:
        body["usage"] = None
    return body


def chat_chunk_role(request_id: str, model: str, created: int, index: int, include_usage: bool = False) -> dict:
    """The first chunk of a streamed choice: ``delta: {"role": "assistant", "content": ""}``."""
    choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return _with_usage_null(_envelope(request_id, CHAT_CHUNK_OBJECT, model, created, [choice]), include_usage)


def chat_chunk_delta(
    request_id: str,
    model: str,
    created: int,
    index: int,
    text: str,
    logprobs: Sequence[TokenLogprob] | None = None,
    finish_reason: str | None = None,
    include_usage: bool = False,
    stop_reason: str | int | None = None,
) -> dict:
    """A content chunk; the final one carries ``finish_reason`` (and ``delta: {}`` when it adds no text)."""
    delta = {} if finish_reason is not None and not text else {"content": text}
    return chat_chunk(request_id, model, created, index, delta, logprobs, finish_reason, include_usage, stop_reason)


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    index: int,
    delta: Mapping[str, Any],
    logprobs: Sequence[TokenLogprob] | None = None,
    finish_reason: str | None = None,
    include_usage: bool = False,
    stop_reason: str | int | None = None,
) -> dict:
    """A chunk with any ``delta``: ``{"content": ...}``, ``{"tool_calls": [...]}`` (``tool_call_delta``) or ``{}``.
    The finishing chunk also carries vLLM's ``stop_reason``."""
    _check_finish_reason(finish_reason)
    choice = {"index": index, "delta": dict(delta), "logprobs": _chat_logprobs(logprobs),
              "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return _with_usage_null(_envelope(request_id, CHAT_CHUNK_OBJECT, model, created, [choice]), include_usage)


def tool_call_delta(position: int, call_id: str | None = None, name: str | None = None, arguments: str = "") -> dict:
    """``delta.tool_calls[i]`` in OpenAI's stream: the first one of a call has ``id``, ``type`` and the name
    (``arguments: ""``); later ones only ``index`` and a piece of ``arguments``."""
    if call_id is None:
        return {"index": position, "function": {"arguments": arguments}}
    return {"index": position, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def completion_chunk(
    request_id: str,
    model: str,
    created: int,
    index: int,
    text: str,
    logprobs: Sequence[TokenLogprob] | None = None,
    finish_reason: str | None = None,
    text_offset: int = 0,
    include_usage: bool = False,
    stop_reason: str | int | None = None,
) -> dict:
    """A streamed completions chunk; ``text_offset`` is the length of the choice's text sent before it. The
    finishing chunk also carries vLLM's ``stop_reason``."""
    _check_finish_reason(finish_reason)
    choice = {
        "index": index,
        "text": text,
        "logprobs": _legacy_logprobs(logprobs, text_offset),
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return _with_usage_null(_envelope(request_id, COMPLETION_OBJECT, model, created, [choice]), include_usage)


def usage_chunk(
    request_id: str, model: str, created: int, usage: dict, endpoint: Literal["chat", "completion"] = "chat"
) -> dict:
    """The last chunk before ``[DONE]`` when ``include_usage``: no choices, the whole request's usage."""
    body = _envelope(request_id, CHAT_CHUNK_OBJECT if endpoint == "chat" else COMPLETION_OBJECT, model, created, [])
    body["usage"] = usage
    return body


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <compact JSON, UTF-8>\\n\\n`` (a str goes as is, one data line per line)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return ("".join(f"data: {line}\n" for line in payload.split("\n")) + "\n").encode()


def model_card(model_id: str, created: int) -> dict:
    """``GET /v1/models/{id}``."""
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": OWNED_BY}


def models_list(model_ids: Iterable[str], created: int) -> dict:
    """``GET /v1/models``."""
    return {"object": "list", "data": [model_card(model_id, created) for model_id in model_ids]}

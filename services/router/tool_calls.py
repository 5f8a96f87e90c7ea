"""Tool calling on /v1/chat/completions: which calls a request allows, how its prompt shows the tools, and how the
answer is read back (the formats themselves are in ``tool_parsers``).

tool_choice, as vLLM implements it:

- ``none``: the tools are still rendered into the prompt (vLLM's default, so the conversation reads the same), but
  the answer is not parsed: it is plain content.
- ``auto`` (the default when tools are given): needs ``--enable-auto-tool-choice`` and ``--tool-call-parser``
  (else 400); the answer is parsed by that format's parser and may mix content and calls.
- ``required``: the answer is constrained (``tool_constraint``) to a JSON array of one or more
  ``{"name": <one of the tools>, "parameters": <its schema>}`` (at most one when ``parallel_tool_calls`` is false)
  and read as that array.
- a named function: the answer is constrained to that function's parameters schema and is its arguments.

Prompts: when the model's chat template mentions ``tools`` it renders them itself (``apply_chat_template(tools=...)``,
assistant ``tool_calls`` with arguments as objects, ``tool`` messages as given). Otherwise (SmolLM2, for one) the
default below is used:

- the system turn (the first message when it is a system message, else a new one) gets a block that lists the
  tools as JSON inside ``<tools></tools>`` and says how to call them in the parser's format (Hermes
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` unless ``--tool-call-parser`` names another);
- an assistant message's ``tool_calls`` are written after its content in that same format;
- each run of consecutive ``tool`` messages becomes one user message, each result as
  ``<tool_response>\\n{content}\\n</tool_response>``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from common.engine.sampling_params import SamplingParams, StructuredOutputs
from services.router import protocol
from services.router.protocol import (
    ChatCompletionRequest,
    FunctionDefinition,
    NamedToolChoice,
    ProtocolError,
    new_tool_call_id,
)
from services.router.tool_parsers import (
    CALL_FORMATS,
    CALL_IDS,
    SCANNERS,
    NamedScanner,
    RequiredScanner,
    Scanner,
    ToolCallStream,
)

DEFAULT_FORMAT = "hermes"

_INSTRUCTIONS = {
    "hermes": "For each function call, return a JSON object with the function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call>",
    "llama3_json": "To call a function, respond only with a JSON object of the form {\"name\": <function-name>, "
                   "\"parameters\": <args-json-object>}; separate several calls with \"; \".",
    "mistral": "To call functions, respond only with [TOOL_CALLS] followed by a JSON array of "
               "{\"name\": <function-name>, \"arguments\": <args-json-object>} objects.",
}


@dataclass(frozen=True)
class ToolCallConfig:
    """The router's tool-call settings (``--tool-call-parser``, ``--enable-auto-tool-choice``)."""

    parser: str | None = None
    enable_auto: bool = False

    @property
    def call_format(self) -> str:
        """The format prompts teach and answers are read in: the parser's, else Hermes."""
        return self.parser or DEFAULT_FORMAT


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools. Invariants: ``choice`` is "none", "auto", "required" or "named" (then
    ``named`` is one of ``functions``' names); "auto" implies the router has a parser (``call_format``)."""

    functions: tuple[FunctionDefinition, ...]
    choice: str
    call_format: str
    parallel: bool = True
    named: str | None = None

    def scanner(self) -> Scanner | None:
        """A fresh scanner for one choice's text; None when the text is plain content (tool_choice none)."""
        if self.named is not None:
            return NamedScanner(self.named)
        if self.choice == "required":
            return RequiredScanner()
        return SCANNERS[self.call_format]() if self.choice == "auto" else None

    def stream(self) -> ToolCallStream | None:
        scanner = self.scanner()
        new_id = CALL_IDS.get(self.call_format, new_tool_call_id)
        return None if scanner is None else ToolCallStream(scanner, self.parallel, new_id)


def plan_tools(request: ChatCompletionRequest, config: ToolCallConfig) -> ToolPlan | None:
    """The request's tool plan (None without tools); a 400 for "auto" when the router was not started for it."""
    if not request.tools:
        return None
    choice = request.effective_tool_choice
    if choice == "auto" and not (config.enable_auto and config.parser):
        param = "tool_choice" if request.tool_choice is not None else "tools"
        raise ProtocolError(f'{param}: "auto" tool choice requires --enable-auto-tool-choice and '
                            "--tool-call-parser to be set", param=param)
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    return ToolPlan(functions=tuple(tool.function for tool in request.tools),
                    choice="named" if named is not None else choice, call_format=config.call_format,
                    parallel=request.parallel_tool_calls, named=named)


# ---------------------------------------------------------------------------------------------- constraint
def tool_constraint(plan: ToolPlan | None) -> dict | None:
    """The JSON schema the answer must follow: for "required" an array of calls (anyOf one object per tool, at
    most one item without parallel calls), for a named function its parameters; None otherwise (no constraint)."""
    if plan is None:
        return None
    if plan.named is not None:
        return next(function.parameters for function in plan.functions if function.name == plan.named)
    if plan.choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [function.name]},
                                               "parameters": function.parameters},
              "required": ["name", "parameters"], "additionalProperties": False} for function in plan.functions]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not plan.parallel:
        schema["maxItems"] = 1
    return schema


def constrained_params(params: SamplingParams, plan: ToolPlan | None) -> SamplingParams:
    """``params`` with the plan's output constraint, and with special tokens kept when the format needs them.

    The one place where tool calling sets SamplingParams.structured_outputs: ``required`` and a named function
    are constrained to the tools' JSON schemas, so their arguments always parse and validate.
    """
    if plan is not None and plan.choice == "auto" and plan.call_format == "mistral":
        params = params.replace(skip_special_tokens=False)  # [TOOL_CALLS] is a special token
    schema = tool_constraint(plan)
    if schema is None:
        return params
    if params.structured_outputs is not None:
        raise ProtocolError(f'tool_choice: "{plan.choice}" tool choice constrains the output itself; it cannot be '
                            "combined with response_format or structured_outputs", param="tool_choice")
    try:
        return dataclasses.replace(params, structured_outputs=StructuredOutputs(json=json.dumps(schema)))
    except ValueError as error:  # a tool's parameters that the grammar library cannot take: the client's error
        raise ProtocolError(f"tools: {error}", param="tools") from error


# ---------------------------------------------------------------------------------------------- prompt
def template_renders_tools(tokenizer) -> bool:
    """Whether the model's chat template handles tools itself (it mentions ``tools``)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(str(value) for value in template.values())
    return isinstance(template, str) and "tools" in template


def render_chat(tokenizer, request: ChatCompletionRequest, plan: ToolPlan | None, call_format: str) -> str:
    """The prompt text for a chat request, tools and tool turns included (see the module docstring), with the
    request's ``chat_template_kwargs``, ``add_generation_prompt`` and ``continue_final_message`` (vLLM's)."""
    messages = protocol.messages_for_template(request)
    kwargs = dict(request.chat_template_kwargs or {})
    if request.continue_final_message:
        kwargs["continue_final_message"] = True
    if template_renders_tools(tokenizer):
        if plan is not None:
            kwargs["tools"] = [{"type": "function", "function": function.model_dump(exclude_none=True)}
                               for function in plan.functions]
    else:
        messages = default_tool_messages(messages, plan.functions if plan else (), call_format)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=request.add_generation_prompt, **kwargs)
    except Exception as error:  # noqa: BLE001 - templates raise anything (jinja errors on bad roles/order)
        raise ProtocolError(f"messages: the chat template rejected them: {error}", param="messages") from error


def default_tool_messages(messages: list[dict], functions: tuple[FunctionDefinition, ...],
                          call_format: str) -> list[dict]:
    """Messages for a template that knows nothing of tools: the tools in the system turn, calls and results as
    text. Without tools or tool turns the messages come back unchanged."""
    out: list[dict] = []
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            _add_tool_result(out, message, follows_tool=i > 0 and messages[i - 1]["role"] == "tool")
        elif message.get("tool_calls"):
            calls = [(call["function"]["name"], call["function"]["arguments"]) for call in message["tool_calls"]]
            text = CALL_FORMATS[call_format](calls)
            content = f"{message['content']}\n{text}" if message["content"] else text
            out.append({key: value for key, value in message.items() if key != "tool_calls"} | {"content": content})
        else:
            out.append(message)
    if functions:
        out = _with_tools_in_system(out, functions, call_format)
    return out


def _add_tool_result(out: list[dict], message: dict, follows_tool: bool) -> None:
    result = f"<tool_response>\n{message['content']}\n</tool_response>"
    if follows_tool:
        out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{result}"}
    else:
        out.append({"role": "user", "content": result})


def _with_tools_in_system(messages: list[dict], functions: tuple[FunctionDefinition, ...], call_format: str
                          ) -> list[dict]:
    block = tools_system_block(functions, call_format)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{block}" if first["content"] else block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def tools_system_block(functions: tuple[FunctionDefinition, ...], call_format: str) -> str:
    """The default tools section of the system turn."""
    listed = "\n".join(json.dumps({"type": "function", "function": function.model_dump(exclude_none=True)},
                                  ensure_ascii=False) for function in functions)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n"
            f"</tools>\n\n{_INSTRUCTIONS[call_format]}")

"""Tool-call parsers: model text -> message content and function calls, whole or as OpenAI stream deltas.

One scanner per choice reads the text as it grows (``scan(text, final)``) and returns what has become certain:
content, whole calls, or (for a named tool_choice) a call's start and pieces of its arguments. Text that may still
be call markup (a partial ``<tool_call>``, an unfinished JSON object) is held until it is decided. A whole answer
is the same scanner run once with ``final=True``, so a stream's deltas always add up to the non-streamed parse,
wherever the text was split.

Formats (``--tool-call-parser``), as vLLM reads them:

- ``hermes`` (Hermes, Qwen): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call;
  a last block left open at the end of the text counts when its JSON is whole.
- ``llama3_json``: the answer starts with ``{"name": ..., "parameters": {...}}`` (``"arguments"`` also read),
  after an optional ``<|python_tag|>``; several calls are separated by ``;``. Anything else is content.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (the special token must reach the text:
  the parser turns ``skip_special_tokens`` off).

A call block whose JSON does not parse, or is not ``{"name": str, "arguments"|"parameters": object}``, is kept as
plain content (markup included); it never fails the request. Calls are emitted whole once their markup closes: a
call's first delta carries its id, type and name, the next its arguments (one piece), except for a named
tool_choice, whose arguments stream as the model writes them. Content is stripped of leading and trailing
whitespace (interior whitespace, including around calls, is kept), and is None when the message has calls only.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.router.protocol import ToolCall, new_tool_call_id, tool_call_delta

PARSERS = ("hermes", "llama3_json", "mistral")

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Piece:
    """A decided part of the text: ``content``, a whole call (``name`` and ``arguments``), a call's start
    (``name`` only, ``start=True``) or a piece of the open call's arguments (``arguments`` only)."""

    content: str = ""
    name: str | None = None
    arguments: str | None = None
    start: bool = False


class Scanner(Protocol):
    def scan(self, text: str, final: bool) -> list[Piece]:
        """Decide the text past what earlier calls decided. ``text`` only grows between calls; with ``final``
        everything is decided."""


def _content(text: str) -> list[Piece]:
    return [Piece(content=text)] if text else []


def _holdback(text: str, start: int, marker: str) -> int:
    """How many characters at the end of ``text[start:]`` could begin ``marker`` (and must wait)."""
    for size in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if marker.startswith(text[len(text) - size :]):
            return size
    return 0


def call_of(value: Any) -> Piece | None:
    """A whole call from a decoded ``{"name": str, "arguments"|"parameters": object}``; None for any other shape."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return Piece(name=value["name"], arguments=json.dumps(arguments, ensure_ascii=False))


def _call_of_text(text: str) -> Piece | None:
    try:
        return call_of(json.loads(text))
    except ValueError:
        return None


def _decode_at(text: str, position: int) -> tuple[Any, int] | None:
    """The JSON value starting at ``position`` and where it ends, or None (incomplete or malformed)."""
    try:
        return _DECODER.raw_decode(text, position)
    except ValueError:
        return None


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


# ---------------------------------------------------------------------------------------------- hermes
class HermesScanner:
    """A block's JSON is decoded as JSON (so a ``</tool_call>`` inside a string does not end it). A block that does
    not decode is held until the end of the text, since until then it may be unfinished, not malformed; at the end
    it is content up to its closing tag."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self.position = 0

    def scan(self, text: str, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        while True:
            opened = text.find(self.OPEN, self.position)
            if opened < 0:
                end = len(text) if final else len(text) - _holdback(text, self.position, self.OPEN)
                pieces += _content(text[self.position : end])
                self.position = end
                return pieces
            pieces += _content(text[self.position : opened])
            self.position = opened
            block = self._block(text, opened, final)
            if block is None:
                return pieces
            pieces += block[0] if block[0] is not None else _content(text[opened : block[1]])
            self.position = block[1]

    def _block(self, text: str, opened: int, final: bool) -> tuple[list[Piece] | None, int] | None:
        """The call (None: not a call) of the block at ``opened`` and where the block ends; None to wait."""
        decoded = _decode_at(text, _skip(text, opened + len(self.OPEN), " \t\r\n"))
        if decoded is not None:
            after = _skip(text, decoded[1], " \t\r\n")
            call = call_of(decoded[0])
            if text.startswith(self.CLOSE, after):
                return ([call] if call else None), after + len(self.CLOSE)
            if self.CLOSE.startswith(text[after:]):  # nothing after the JSON but (part of) the closing tag
                return (([call] if call else None), len(text)) if final else None
        closed = text.find(self.CLOSE, decoded[1] if decoded is not None else opened)
        if closed >= 0 and (decoded is not None or final):
            return None, closed + len(self.CLOSE)
        return (None, len(text)) if final else None


def hermes_calls(calls: Sequence[tuple[str, dict | str]]) -> str:
    return "\n".join(
        f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {_arguments_json(arguments)}}}\n</tool_call>'
        for name, arguments in calls
    )


def _arguments_json(arguments: dict | str) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- llama 3 JSON
class Llama3JsonScanner:
    """Calls only at the start of the answer; the first text that is not a call makes the rest content."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self.position = 0
        self.mode = "start"  # start -> calls -> content

    def scan(self, text: str, final: bool) -> list[Piece]:
        if self.mode == "start":
            self._choose_mode(text, final)
        if self.mode == "calls":
            return self._calls(text, final)
        if self.mode == "content":
            pieces = _content(text[self.position :])
            self.position = len(text)
            return pieces
        return []

    def _choose_mode(self, text: str, final: bool) -> None:
        head = text.lstrip()
        if head.startswith(self.TAG) or head.startswith("{"):
            self.mode, self.position = "calls", len(text) - len(head)
        elif final or (head and not self.TAG.startswith(head)):
            self.mode = "content"

    def _calls(self, text: str, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        while True:
            start = _skip(text, self.position, " \t\r\n;")
            if text.startswith(self.TAG, start):
                start += len(self.TAG)
            rest = text[start:]
            if not final and (not rest or self.TAG.startswith(rest)):
                return pieces
            decoded = _decode_at(text, start) if rest.startswith("{") else None
            if decoded is None and rest.startswith("{") and not final:
                return pieces  # an unfinished object
            call = call_of(decoded[0]) if decoded is not None else None
            if call is None:
                self.mode, self.position = "content", start
                return pieces + self.scan(text, final)
            pieces.append(call)
            self.position = decoded[1]


def llama3_calls(calls: Sequence[tuple[str, dict | str]]) -> str:
    return "; ".join(f'{{"name": {json.dumps(name)}, "parameters": {_arguments_json(arguments)}}}'
                     for name, arguments in calls)


# ---------------------------------------------------------------------------------------------- mistral
class MistralScanner:
    MARKER = "[TOOL_CALLS]"

    def __init__(self) -> None:
        self.position = 0

    def scan(self, text: str, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        while True:
            marked = text.find(self.MARKER, self.position)
            if marked < 0:
                end = len(text) if final else len(text) - _holdback(text, self.position, self.MARKER)
                pieces += _content(text[self.position : end])
                self.position = end
                return pieces
            pieces += _content(text[self.position : marked])
            self.position = marked
            start = _skip(text, marked + len(self.MARKER), " \t\r\n")
            decoded = _decode_at(text, start)
            if decoded is None and not final:
                return pieces
            calls = _array_calls(decoded[0]) if decoded is not None else None
            end = decoded[1] if decoded is not None else len(text)
            pieces += calls if calls is not None else _content(text[marked:end])
            self.position = end


def _array_calls(value: Any) -> list[Piece] | None:
    values = value if isinstance(value, list) else [value]
    calls = [call_of(item) for item in values]
    return None if not calls or any(call is None for call in calls) else calls


def mistral_call_id() -> str:
    """Mistral's templates take only 9 letters and digits as a call id (vLLM makes them the same way)."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def mistral_calls(calls: Sequence[tuple[str, dict | str]]) -> str:
    items = ", ".join(f'{{"name": {json.dumps(name)}, "arguments": {_arguments_json(arguments)}}}'
                      for name, arguments in calls)
    return f"[TOOL_CALLS][{items}]"


# ---------------------------------------------------------------------------------------------- constrained
class RequiredScanner:
    """``tool_choice: "required"``: the text is a JSON array of ``{"name", "parameters"}`` (the constraint's
    shape); each element is a call as soon as it closes. Text that breaks the shape is content from there on."""

    def __init__(self) -> None:
        self.position = 0
        self.state = "open"  # open -> items -> done

    def scan(self, text: str, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        if self.state == "open":
            start = _skip(text, 0, " \t\r\n")
            if start >= len(text) and not final:
                return pieces
            if not text.startswith("[", start):
                return self._rest_as_content(text)
            self.position, self.state = start + 1, "items"
        while self.state == "items":
            start = _skip(text, self.position, " \t\r\n,")
            if text.startswith("]", start):
                self.position, self.state = start + 1, "done"
                break
            decoded = _decode_at(text, start)
            if decoded is None and not final:
                return pieces  # an unfinished element
            call = call_of(decoded[0]) if decoded is not None else None
            if call is None:
                return pieces + self._rest_as_content(text)
            pieces.append(call)
            self.position = decoded[1]
        return pieces + self._rest_as_content(text) if final else pieces

    def _rest_as_content(self, text: str) -> list[Piece]:
        pieces = _content(text[self.position :])
        self.position, self.state = len(text), "done"
        return pieces


class NamedScanner:
    """A named tool_choice: the whole text is the arguments of a call to ``name`` (the constraint makes it that
    function's parameters); they stream as they come."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.position = 0
        self.started = False

    def scan(self, text: str, final: bool) -> list[Piece]:
        pieces = [] if self.started else [Piece(name=self.name, start=True)]
        self.started = True
        if len(text) > self.position:
            pieces.append(Piece(arguments=text[self.position :]))
            self.position = len(text)
        return pieces


# ---------------------------------------------------------------------------------------------- one choice
@dataclass
class ToolCallStream:
    """One choice's text turned into content and calls. ``feed`` returns the OpenAI deltas to send; after the
    final ``feed``, ``content`` and ``calls`` are the whole message. With ``parallel`` False only the first call is
    kept (later ones are dropped, as vLLM does). ``new_id`` names each call."""

    scanner: Scanner
    parallel: bool = True
    new_id: Callable[[], str] = new_tool_call_id
    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    _content: list[str] = field(default_factory=list)
    _held_space: str = ""
    _open_arguments: list[str] = field(default_factory=list)

    @property
    def finishes_with_tool_calls(self) -> bool:
        """The choice's finish_reason becomes "tool_calls" when it made calls, as OpenAI (and vLLM) report them for
        tool_choice auto and required; a named function choice finishes with "stop" there."""
        return bool(self.calls) and not isinstance(self.scanner, NamedScanner)

    @property
    def content(self) -> str | None:
        """Text outside calls, stripped; None when it is empty and there are calls."""
        text = "".join(self._content)
        return None if not text and self.calls else text

    def feed(self, delta: str, final: bool) -> list[dict]:
        self.text += delta
        out: list[dict] = []
        for piece in self.scanner.scan(self.text, final):
            if piece.name is None and piece.arguments is None:
                self._add_content(piece.content, out)
            else:
                self._add_call(piece, out)
        if final:
            self._close_open_call()
        return out

    def _add_content(self, text: str, out: list[dict]) -> None:
        """Leading whitespace is dropped and trailing whitespace held until more content follows."""
        text = self._held_space + text if self._content else text.lstrip()
        body = text.rstrip()
        self._held_space = text[len(body) :]
        if body:
            self._content.append(body)
            if out and "content" in out[-1]:
                out[-1]["content"] += body
            else:
                out.append({"content": body})

    def _add_call(self, piece: Piece, out: list[dict]) -> None:
        if piece.name is None:  # a piece of the open call's arguments
            if self._open_arguments:
                self._open_arguments.append(piece.arguments)
                out.append({"tool_calls": [tool_call_delta(len(self.calls) - 1, arguments=piece.arguments)]})
            return
        if self.calls and not self.parallel:
            return
        self._close_open_call()
        call = ToolCall(piece.name, piece.arguments or "", self.new_id())
        self.calls.append(call)
        position = len(self.calls) - 1
        out.append({"tool_calls": [tool_call_delta(position, call.id, call.name)]})
        if piece.start:
            self._open_arguments = [""]
        elif call.arguments:
            out.append({"tool_calls": [tool_call_delta(position, arguments=call.arguments)]})

    def _close_open_call(self) -> None:
        if self._open_arguments:
            last = self.calls[-1]
            self.calls[-1] = ToolCall(last.name, "".join(self._open_arguments), last.id)
            self._open_arguments = []


def parse(scanner: Scanner, text: str, parallel: bool = True) -> tuple[str | None, list[ToolCall]]:
    """The whole text at once: (content, calls)."""
    stream = ToolCallStream(scanner, parallel)
    stream.feed(text, final=True)
    return stream.content, stream.calls


CALL_IDS = {"mistral": mistral_call_id}
SCANNERS = {"hermes": HermesScanner, "llama3_json": Llama3JsonScanner, "mistral": MistralScanner}
CALL_FORMATS = {"hermes": hermes_calls, "llama3_json": llama3_calls, "mistral": mistral_calls}

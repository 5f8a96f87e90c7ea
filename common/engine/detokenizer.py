"""Incremental detokenization and stop-string matching for streamed output text.

`IncrementalDetokenizer` uses the prefix_offset/read_offset technique of vLLM and TGI: each step decodes
a short window of ids (a few already-emitted tokens for context plus the new ones) and emits only the text
past the context, holding back while the window ends in U+FFFD (an incomplete UTF-8 character).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens that seed the window, so the first output token decodes with its leading space right."""

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, one piece per `append`.

    Invariants: `text` is exactly the concatenation of everything `append` and `flush` returned; it never
    ends in the middle of a multi-byte character before `flush`. After `flush`, for byte-level BPE
    tokenizers and a prompt that decodes cleanly,
    `text == tokenizer.decode(output_ids, skip_special_tokens=...)`.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._decode_kwargs = _decode_kwargs(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        self._ids: list[int] = list(prompt_token_ids[len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS :])
        self._num_prompt_ids = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._text = ""

    @property
    def text(self) -> str:
        """All output text emitted so far (held-back bytes excluded until they complete or `flush`)."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        """Every output token id appended so far."""
        return self._ids[self._num_prompt_ids :]

    def append(self, new_token_ids: Sequence[int]) -> str:
        """Add generated ids; return the newly completed text ("" while a character is incomplete)."""
        self._ids.extend(new_token_ids)
        window_text = self._decode(self._prefix_offset, len(self._ids))
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(window_text)

    def flush(self) -> str:
        """Emit whatever is held back (call once the request finishes); "" when nothing is."""
        if self._read_offset == len(self._ids):
            return ""
        window_text = self._decode(self._prefix_offset, len(self._ids))
        return self._emit(window_text)

    def _emit(self, window_text: str) -> str:
        new_text = window_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._text += new_text
        return new_text

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], **self._decode_kwargs)


def _decode_kwargs(tokenizer: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool) -> dict:
    """Decode options; the spacing flag only exists for slow (Python) tokenizers, fast ones ignore it."""
    kwargs: dict[str, Any] = {
        "skip_special_tokens": skip_special_tokens,
        "clean_up_tokenization_spaces": False,
    }
    if not getattr(tokenizer, "is_fast", True):
        kwargs["spaces_between_special_tokens"] = spaces_between_special_tokens
    return kwargs


@dataclass(frozen=True)
class StopMatch:
    """A stop string was found; `text` is the output cut before it (or after it, when included)."""

    text: str
    stop: str


class StopStringMatcher:
    """Finds stop strings in growing output text, including ones that span several tokens.

    Invariant for streaming: text up to `len(text) - holdback(text)` can be sent to the client; the rest
    might still become a stop string that is cut from the output.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stop = tuple(s for s in stop if s)
        self._include = include_stop_str_in_output
        self._longest = max((len(s) for s in self._stop), default=0)

    def check(self, text: str, new_char_count: int) -> StopMatch | None:
        """The earliest stop string that ends inside the last `new_char_count` chars of `text`, if any.

        Earlier text was checked on previous calls, so only occurrences overlapping the new tail count.
        On a tie in position the stop string listed first wins.
        """
        if not self._stop or new_char_count <= 0:
            return None
        start = max(0, len(text) - new_char_count - self._longest + 1)
        found = [(index, order) for order, s in enumerate(self._stop) if (index := text.find(s, start)) >= 0]
        if not found:
            return None
        index, order = min(found)
        stop = self._stop[order]
        end = index + len(stop) if self._include else index
        return StopMatch(text=text[:end], stop=stop)

    def holdback(self, text: str) -> int:
        """How many trailing chars of `text` are a proper prefix of some stop string (0 if none)."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

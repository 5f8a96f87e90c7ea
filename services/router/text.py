"""Router-side text: incremental detokenization with stop strings held back until they are ruled out.

Workers decide when a request stops (they see the same tokens); the router turns token ids into the
text the client reads, so no worker spends time on strings for streams it does not serve.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from common.engine.sampling_params import SamplingParams


class TextAssembler:
    """Invariant: text already returned by ``add`` is never taken back (a partial stop string is held)."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, list(prompt_token_ids), params.skip_special_tokens,
                                                   params.spaces_between_special_tokens)
        self._matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        self._text = ""
        self._sent = 0
        self._stopped = False

    @property
    def text(self) -> str:
        return self._text

    def add(self, token_ids: Sequence[int], finished: bool) -> str:
        """Append tokens; return the text newly safe to show (all of it once ``finished``)."""
        if self._stopped:
            return ""
        delta = self._detokenizer.append(list(token_ids))
        if finished:
            delta += self._detokenizer.flush()
        self._text += delta
        if self._matcher is not None:
            match = self._matcher.check(self._text, len(delta))
            if match is not None:
                self._text, self._stopped, finished = match.text, True, True
        safe = len(self._text) if finished or self._matcher is None else len(self._text) - self._matcher.holdback(
            self._text)
        new_text = self._text[self._sent : safe]
        self._sent = max(self._sent, safe)
        return new_text

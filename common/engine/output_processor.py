"""Per-request output state: incremental text, stop strings, logprob dicts, and the RequestOutput view."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from common.engine.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from common.engine.request import Request


@dataclass
class _SampleState:
    """Text and logprob views of one sample, grown one token at a time."""

    request: Request
    detokenizer: IncrementalDetokenizer | None
    matcher: StopStringMatcher | None
    text: str = ""
    stopped_by_string: bool = False
    logprob_dicts: list[dict[int, Logprob]] = field(default_factory=list)


class RequestGroup:
    """All ``n`` samples of one request; finished when every sample has finished."""

    def __init__(self, head: Request, tokenizer, export_kv: bool = False) -> None:
        self.request_id = head.group_id
        self.export_kv = export_kv
        self.exported_kv = None
        self.head = head
        self.tokenizer = tokenizer
        self.n = head.sampling_params.n
        self.samples: list[Request] = []
        self._states: dict[str, _SampleState] = {}
        self._prompt_logprob_dicts: list[dict[int, Logprob] | None] = [None]
        self.add_sample(head)

    @property
    def finished(self) -> bool:
        return len(self.samples) == self.n and all(sample.is_finished for sample in self.samples)

    def add_sample(self, sample: Request) -> None:
        params = sample.sampling_params
        detokenizer = matcher = None
        if self.tokenizer is not None:
            # seeded with every token so far: a resumed request continues its text where it left off
            detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                sample.all_token_ids,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
            )
            if params.stop:
                matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.samples.append(sample)
        self._states[sample.request_id] = _SampleState(sample, detokenizer, matcher)

    def append_text(self, sample: Request) -> bool:
        """Detokenize the sample's newest token; True when a stop string just ended the sample."""
        state = self._states[sample.request_id]
        self._record_logprobs(state)
        if state.detokenizer is None:
            return False
        delta = state.detokenizer.append(sample.output_token_ids[-1:])
        state.text += delta
        if state.matcher is None or not delta:
            return False
        match = state.matcher.check(state.text, len(delta))
        if match is None:
            return False
        state.text = match.text
        state.stopped_by_string = True
        sample.stop_reason = match.stop
        return True

    def finalize(self, sample: Request) -> None:
        """At finish, emit any bytes the detokenizer held back (unless a stop string cut the text)."""
        state = self._states[sample.request_id]
        if state.detokenizer is not None and not state.stopped_by_string:
            state.text += state.detokenizer.flush()

    def to_output(self) -> RequestOutput:
        head = self.head
        return RequestOutput(
            request_id=self.request_id,
            prompt=head.prompt,
            prompt_token_ids=head.prompt_token_ids,  # never changes after admission: shared, not copied
            prompt_logprobs=self._prompt_logprobs(),
            outputs=[self._completion(s) for s in self.samples],
            finished=self.finished,
            num_cached_tokens=max(head.num_cached_tokens, 0),
            exported_kv=self.exported_kv,
        )

    def _completion(self, sample: Request) -> CompletionOutput:
        state = self._states[sample.request_id]
        wants_logprobs = sample.sampling_params.logprobs is not None
        return CompletionOutput(
            index=sample.sample_index,
            text=state.text,
            token_ids=list(sample.output_token_ids),
            cumulative_logprob=sum(lp.logprob for lp in sample.output_logprobs) if wants_logprobs else None,
            logprobs=list(state.logprob_dicts) if wants_logprobs else None,
            finish_reason=sample.status.value if sample.is_finished else None,
            stop_reason=sample.stop_reason,
        )

    def _record_logprobs(self, state: _SampleState) -> None:
        pending = state.request.output_logprobs[len(state.logprob_dicts) :]
        state.logprob_dicts.extend(self._as_dict(lp) for lp in pending)

    def _prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        if not self.head.wants_prompt_logprobs:
            return None
        pending = self.head.prompt_logprobs[len(self._prompt_logprob_dicts) - 1 :]
        self._prompt_logprob_dicts.extend(self._as_dict(lp) for lp in pending)
        return list(self._prompt_logprob_dicts)

    def _as_dict(self, logprobs: TokenLogprobs) -> dict[int, Logprob]:
        if self.tokenizer is None:
            return logprobs.to_dict()
        return logprobs.to_dict(lambda token_id: self.tokenizer.decode([token_id]))

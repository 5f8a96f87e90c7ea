"""One step's results applied to its requests: forks, new tokens, stops, KV export, and the outputs."""

from __future__ import annotations

import torch

from common.engine.kv_transfer import KVTransfer
from common.engine.model_runner import RunnerOutput
from common.engine.output_processor import RequestGroup
from common.engine.outputs import RequestOutput, TokenLogprobs
from common.engine.request import Request, RequestStatus
from common.engine.request_lifecycle import RequestLifecycle
from common.engine.scheduler import ScheduledRequest, SchedulerOutput
from common.engine.spec.speculator import Speculator
from common.engine.stats import SpeculationCounters
from common.engine.stop_conditions import token_stop_status


class SampledTokenApplier:
    """Appends each sampled token to its sample in scheduling order and finishes the samples that stop.

    A sample of an ``export_kv`` request gets its KV gathered before it finishes (finishing frees its blocks).
    """

    def __init__(
        self,
        requests: RequestLifecycle,
        kv_transfer: KVTransfer,
        max_model_len: int,
        speculation: SpeculationCounters | None = None,
        speculator: Speculator | None = None,
    ) -> None:
        self.requests = requests
        self.kv_transfer = kv_transfer
        self.max_model_len = max_model_len
        self.speculation = speculation if speculation is not None else SpeculationCounters()
        self.speculator = speculator

    def apply(self, step: SchedulerOutput, result: RunnerOutput, only_finished: bool) -> list[RequestOutput]:
        """The current output of each request the step touched (only finished ones when ``only_finished``)."""
        touched: dict[str, RequestGroup] = {}
        for item in step.scheduled:
            request = item.request
            group = self.requests.groups[request.group_id]
            if request.request_id in result.prompt_logprobs:
                request.prompt_logprobs.extend(result.prompt_logprobs[request.request_id])
            sampled = result.sampled.get(request.request_id, [])
            if item.spec_token_ids and sampled:
                result.sampled[request.request_id] = self._verify(group, item, sampled, result)
            elif sampled:
                # the prompt's first step samples one token per sample: the forks are made here
                samples = self.requests.fork_samples(request, len(sampled))
                for sample, (token, logprobs) in zip(samples, sampled, strict=True):
                    self._append_token(group, sample, token, logprobs)
            touched[group.request_id] = group
        outputs = [group.to_output() for group in touched.values() if group.finished or not only_finished]
        self.requests.forget_finished(list(touched.values()))
        return outputs

    def _verify(
        self,
        group: RequestGroup,
        item: ScheduledRequest,
        sampled: list[tuple[int, TokenLogprobs | None]],
        result: RunnerOutput,
    ) -> list[tuple[int, TokenLogprobs | None]]:
        """Speculative decoding: ``sampled[j]`` is the target's own token after the first j drafts. Drafts are
        accepted while each equals the target's token there; the target's tokens up to and including the first
        mismatch (or the one after the last draft) are emitted, exactly what plain decoding would have sampled
        (for a sampled row: a one-hot draft accepted iff the target's draw picks it is rejection sampling).
        Returns the emitted tokens; the KV of the rejected drafts' positions is simply not counted as computed."""
        request = item.request
        drafts = result.draft_tokens.get(request.request_id, item.spec_token_ids)  # a draft model's, else n-gram's
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == sampled[accepted][0]:
            accepted += 1
        emitted = sampled[: accepted + 1]
        self._rewind_generator(request, result.generator_states.get(request.request_id), len(emitted))
        appended = 0
        for token, logprobs in emitted:
            self._append_token(group, request, token, logprobs)
            appended += 1
            if request.is_finished:
                break
        if not request.is_finished:
            request.num_computed_tokens = item.num_computed_tokens + 1 + accepted
        if self.speculator is not None:
            self.speculator.on_verified(request, accepted)
        self.speculation.record(len(drafts), accepted, appended)
        return emitted[:appended]

    @staticmethod
    def _rewind_generator(request: Request, state: torch.Tensor | None, num_emitted: int) -> None:
        """A seeded sampled request drew one uniform per verified row; keep exactly one per emitted token."""
        if state is None or request.generator is None or request.sampling_params.is_greedy:
            return
        request.generator.set_state(state)
        for _ in range(num_emitted):  # one (1,)-shaped draw per token, as the sampler takes them
            torch.rand((1,), generator=request.generator)

    def _append_token(self, group: RequestGroup, sample: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        sample.append_output_token(token, logprobs)
        status = token_stop_status(sample, token, self.max_model_len)
        if group.append_text(sample) and status is None:
            status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            if group.export_kv:
                group.exported_kv = self.kv_transfer.gather_kv(sample)
            self.requests.finish(group, sample, status)

"""One step's results applied to its requests: forks, new tokens, stops, KV export, and the outputs."""

from __future__ import annotations

from common.engine.kv_transfer import KVTransfer
from common.engine.model_runner import RunnerOutput
from common.engine.output_processor import RequestGroup
from common.engine.outputs import RequestOutput, TokenLogprobs
from common.engine.request import Request, RequestStatus
from common.engine.request_lifecycle import RequestLifecycle
from common.engine.scheduler import SchedulerOutput
from common.engine.stop_conditions import token_stop_status


class SampledTokenApplier:
    """Appends each sampled token to its sample in scheduling order and finishes the samples that stop.

    A sample of an ``export_kv`` request gets its KV gathered before it finishes (finishing frees its blocks).
    """

    def __init__(self, requests: RequestLifecycle, kv_transfer: KVTransfer, max_model_len: int) -> None:
        self.requests = requests
        self.kv_transfer = kv_transfer
        self.max_model_len = max_model_len

    def apply(self, step: SchedulerOutput, result: RunnerOutput, only_finished: bool) -> list[RequestOutput]:
        """The current output of each request the step touched (only finished ones when ``only_finished``)."""
        touched: dict[str, RequestGroup] = {}
        for item in step.scheduled:
            request = item.request
            group = self.requests.groups[request.group_id]
            if request.request_id in result.prompt_logprobs:
                request.prompt_logprobs.extend(result.prompt_logprobs[request.request_id])
            sampled = result.sampled.get(request.request_id, [])
            if sampled:
                # the prompt's first step samples one token per sample: the forks are made here
                samples = self.requests.fork_samples(request, len(sampled))
                for sample, (token, logprobs) in zip(samples, sampled, strict=True):
                    self._append_token(group, sample, token, logprobs)
            touched[group.request_id] = group
        outputs = [group.to_output() for group in touched.values() if group.finished or not only_finished]
        self.requests.forget_finished(list(touched.values()))
        return outputs

    def _append_token(self, group: RequestGroup, sample: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        sample.append_output_token(token, logprobs)
        status = token_stop_status(sample, token, self.max_model_len)
        if group.append_text(sample) and status is None:
            status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            if group.export_kv:
                group.exported_kv = self.kv_transfer.gather_kv(sample)
            self.requests.finish(group, sample, status)

"""Live requests from admission to finish: ids, groups of n samples, forking, aborting, finishing."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from common.engine.kv_cache_manager import KVCacheManager
from common.engine.output_processor import RequestGroup
from common.engine.request import Request, RequestStatus
from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import Scheduler
from common.engine.stats import EngineStatsRecorder
from common.engine.structured import GrammarCompiler, GrammarState


class RequestLifecycle:
    """Owns ``groups``: a request's group is there from admission until all its ``n`` samples have finished.

    Every sample in a group is either in the scheduler (waiting or running, holding blocks) or finished.
    Callers validate first: nothing here checks token ids or lengths (a resumed request's tokens are checked
    against its grammar, since its matcher is built here).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        kv_cache_manager: KVCacheManager,
        stats_recorder: EngineStatsRecorder,
        tokenizer,
        eos_token_ids: frozenset[int],
        block_size: int,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.kv_cache_manager = kv_cache_manager
        self.stats_recorder = stats_recorder
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.block_size = block_size
        self.grammars = grammars
        self.groups: dict[str, RequestGroup] = {}
        self._request_counter = itertools.count()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.groups

    def add(
        self,
        request_id: str | None,
        token_ids: list[int],
        params: SamplingParams,
        output_token_ids: Sequence[int],
        prompt: str | None,
        export_kv: bool,
        lora_name: str | None = None,
    ) -> str:
        """Queue a validated request (waiting for its prefill) under its id, or ``req-<k>`` when it has none;
        ``lora_name``: the (checked) adapter it runs under, None for the base model."""
        request_id = request_id or f"req-{next(self._request_counter)}"
        head = self.new_request(request_id, token_ids, params, output_token_ids, prompt, lora_name)
        head.export_kv = export_kv
        self.groups[request_id] = RequestGroup(head, self.tokenizer, export_kv=export_kv)
        self.scheduler.add_request(head)
        return request_id

    def add_running(self, head: Request) -> None:
        """Start decoding a request whose blocks already hold the KV of its computed tokens."""
        self.groups[head.request_id] = RequestGroup(head, self.tokenizer)
        self.scheduler.add_running(head)

    def new_request(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        output_token_ids: Sequence[int],
        prompt: str | None = None,
        lora_name: str | None = None,
    ) -> Request:
        """A request's first sample (its forks come later) under a request id not yet in use.

        A structured-output request's matcher has accepted ``output_token_ids`` (ValueError if they break it).
        """
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        grammar = self._grammar_state(params, output_token_ids)
        return Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            block_size=self.block_size,
            generator=seeded_generator(params, 0, draws=len(output_token_ids)),
            prompt=prompt,
            pending_forks=params.n - 1,
            fork_generators=[seeded_generator(params, i) for i in range(1, params.n)],
            output_token_ids=list(output_token_ids),
            grammar=grammar,
            lora_name=lora_name,
        )

    def _grammar_state(self, params: SamplingParams, output_token_ids: Sequence[int]) -> GrammarState | None:
        if params.structured_outputs is None:
            return None
        if self.grammars is None:
            raise ValueError("structured_outputs: this engine has no grammar compiler")
        return self.grammars.new_state(params.structured_outputs, output_token_ids)

    def fork_samples(self, request: Request, num_samples: int) -> list[Request]:
        """``request`` and ``num_samples - 1`` new samples forked from it, in sample order.

        Each fork shares every KV block of ``request`` (one more reference per block, no block allocated
        now: copy-on-write allocates when a sample first writes a shared partial block), joins the running
        queue and the request's group. Clears ``pending_forks`` when it forked anything.
        """
        samples = [request]
        for index in range(1, num_samples):
            child = request.fork(index, request.fork_generators[index - 1])
            self.kv_cache_manager.fork(request, child)
            self.scheduler.add_running(child)
            self.groups[request.group_id].add_sample(child)
            samples.append(child)
        if num_samples > 1:
            request.pending_forks = 0
        return samples

    def finish(self, group: RequestGroup, sample: Request, status: RequestStatus) -> None:
        """End one sample: its blocks go back to the pool and its text flushes (its group may stay live)."""
        self.scheduler.finish(sample, status)
        group.finalize(sample)

    def forget_finished(self, groups: Sequence[RequestGroup]) -> None:
        for group in groups:
            if group.finished:
                del self.groups[group.request_id]

    def abort(self, request_id: str) -> None:
        """Finish a request and all its samples now, returning every block at once; unknown ids are ignored."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for sample in group.samples:
            if not sample.is_finished:
                self.scheduler.finish(sample, RequestStatus.FINISHED_ABORTED)
                self.stats_recorder.on_finish(sample)


def seeded_generator(params: SamplingParams, sample_index: int, draws: int = 0) -> torch.Generator | None:
    """Sample i of a seeded request draws from its own generator seeded seed + i, one uniform per sampled token.

    ``draws``: tokens the request already generated elsewhere (a prefill worker's first token, a migrated
    stream's delivered ones); the generator skips their uniforms, so a seeded output is the same whichever worker
    samples each token.
    """
    if params.seed is None:
        return None
    generator = torch.Generator().manual_seed(params.seed + sample_index)
    for _ in range(draws):  # one (1,)-shaped draw per token, exactly as the sampler takes them
        torch.rand((1,), generator=generator)
    return generator

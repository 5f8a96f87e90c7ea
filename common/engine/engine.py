"""The engine: validates requests, steps scheduler -> runner -> outputs, and owns nothing global."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from common.config import EngineConfig
from common.engine.block_pool import BlockPool
from common.engine.cuda_graphs import DecodeGraphs
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.kv_cache_sizing import allocate_kv_cache
from common.engine.model_runner import ModelRunner, RunnerOutput
from common.engine.output_processor import RequestGroup
from common.engine.outputs import RequestOutput, TokenLogprobs
from common.engine.request import Request, RequestStatus
from common.engine.sampler import Sampler
from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import Scheduler, SchedulerOutput
from common.engine.stats import EngineStats, EngineStatsRecorder
from common.models.loader import load_model, resolve_dtype, resolve_model_path

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the current CUDA device when there is one, else CPU; CUDA always gets an explicit index."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


@dataclass(frozen=True)
class MemoryReport:
    """Device memory the engine holds, as reported at startup."""

    weight_bytes: int
    kv_cache_bytes: int
    num_kv_blocks: int
    kv_cache_tokens: int


class LLMEngine:
    """Continuous-batching engine over one model on one device.

    ``add_request`` validates everything before touching any state, so a bad request raises
    ``ValueError`` and leaves every running request undisturbed.
    """

    def __init__(self, config: EngineConfig) -> None:
        started = time.perf_counter()
        self.config = config
        self.device = resolve_device(config.model.device)
        self.model_path = resolve_model_path(config.model.model, config.model.download_dir)
        self.hf_config: PretrainedConfig = AutoConfig.from_pretrained(self.model_path)
        self.tokenizer = self._load_tokenizer()
        self.dtype = resolve_dtype(config.model.dtype, self.hf_config, self.device)
        self.model = load_model(self.model_path, self.hf_config, self.dtype, self.device, config.model.load_format)
        kv_cache, num_blocks = allocate_kv_cache(self.model, config.cache, config.scheduler, self.dtype, self.device)
        self.max_model_len = self._resolve_max_model_len(num_blocks)
        self.eos_token_ids = self._eos_token_ids()
        pool = BlockPool(num_blocks, config.cache.enable_prefix_caching)
        self.kv_cache_manager = KVCacheManager(pool, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager)
        self.generator = torch.Generator().manual_seed(config.model.seed)
        decode_graphs = self._capture_decode_graphs(kv_cache)
        self.runner = ModelRunner(
            self.model, kv_cache, config.cache.block_size, self.device, Sampler(self.generator), decode_graphs
        )
        self.memory = MemoryReport(
            weight_bytes=sum(p.numel() * p.element_size() for p in self.model.parameters()),
            kv_cache_bytes=kv_cache.numel() * kv_cache.element_size(),
            num_kv_blocks=num_blocks,
            kv_cache_tokens=num_blocks * config.cache.block_size,
        )
        self.groups: dict[str, RequestGroup] = {}
        self._request_counter = itertools.count()
        self.stats_recorder = EngineStatsRecorder()
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "engine ready in %.2fs: %s on %s (%s); weights %.2f GiB, KV cache %.2f GiB = %d blocks of %d tokens "
            "(%d tokens); max_model_len %d; decode CUDA graphs %s",
            self.load_seconds,
            self.model_path.name,
            self.device,
            self.dtype,
            self.memory.weight_bytes / 2**30,
            self.memory.kv_cache_bytes / 2**30,
            num_blocks,
            config.cache.block_size,
            self.memory.kv_cache_tokens,
            self.max_model_len,
            f"up to batch {decode_graphs.max_batch}" if decode_graphs else "off",
        )

    # ----------------------------------------------------------------- requests
    def add_request(
        self,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        output_token_ids: Sequence[int] = (),
        export_kv: bool = False,
    ) -> str:
        """Queue one request (its ``n`` samples share the prompt's blocks). Returns its id.

        ``output_token_ids`` resumes a request that already generated tokens elsewhere (they are
        recomputed with the prompt and count towards max_tokens). ``export_kv`` gathers the KV of
        every computed token into the final RequestOutput before the blocks are freed (prefill pool).
        """
        params = sampling_params or SamplingParams()
        token_ids = self.validate_prompt(prompt, prompt_token_ids, params)
        self._validate_resume(token_ids, output_token_ids, params, export_kv)
        request_id = request_id or f"req-{next(self._request_counter)}"
        head = self._new_request(request_id, token_ids, params, output_token_ids, prompt)
        self.groups[request_id] = RequestGroup(head, self.tokenizer, export_kv=export_kv)
        self.scheduler.add_request(head)
        return request_id

    def _validate_resume(
        self, prompt_ids: list[int], output_ids: Sequence[int], params: SamplingParams, export_kv: bool
    ) -> None:
        if export_kv and params.n != 1:
            raise ValueError("n: KV export (disaggregated prefill) takes one sample per request")
        if not output_ids:
            return
        vocab = self.hf_config.vocab_size
        if any(t < 0 or t >= vocab for t in output_ids):
            raise ValueError(f"output_token_ids: token ids must be in [0, {vocab})")
        if len(prompt_ids) + len(output_ids) >= self.max_model_len:
            raise ValueError(f"output_token_ids: prompt plus generated tokens reach max_model_len {self.max_model_len}")
        if params.max_tokens is not None and len(output_ids) >= params.max_tokens:
            raise ValueError(f"output_token_ids: {len(output_ids)} tokens already meet max_tokens {params.max_tokens}")
        if params.n != 1:
            raise ValueError("n: resuming a request takes one sample")

    # ----------------------------------------------------------------- disaggregation
    def reserve_blocks(self, reservation_id: str, num_tokens: int) -> list[int]:
        """Pin enough free blocks for ``num_tokens`` tokens of KV arriving from a prefill worker.

        Raises ValueError when the pool cannot supply them now (the router picks another worker).
        """
        if num_tokens < 1 or num_tokens >= self.max_model_len:
            raise ValueError(f"num_tokens: {num_tokens} is outside [1, max_model_len {self.max_model_len})")
        if reservation_id in self.kv_cache_manager.tables or reservation_id in self.groups:
            raise ValueError(f"reservation_id {reservation_id!r} is already in use")
        return self.kv_cache_manager.reserve(reservation_id, num_tokens)

    def release_reservation(self, reservation_id: str) -> None:
        """Return an unused reservation's blocks (lease expired, transfer failed, request aborted)."""
        self.kv_cache_manager.release(reservation_id)

    @property
    def kv_cache(self) -> torch.Tensor:
        """The KV cache [layers, 2, blocks, block_size, kv_heads, head_dim]. Off the engine thread, write only
        blocks you own (an unadopted reservation's: see ``common.transfer.block_writer``)."""
        return self.runner.kv_cache

    def import_kv(self, reservation_id: str, kv: torch.Tensor) -> None:
        """Write verified KV ([layers, 2, blocks, block_size, heads, dim]) into a reservation's blocks."""
        block_ids = self.kv_cache_manager.block_ids(reservation_id)
        if not block_ids:
            raise ValueError(f"reservation_id {reservation_id!r} is unknown or expired")
        cache = self.runner.kv_cache
        if kv.shape[0:2] != cache.shape[0:2] or kv.shape[3:] != cache.shape[3:] or kv.shape[2] > len(block_ids):
            raise ValueError(
                f"kv shape {tuple(kv.shape)} does not fit reservation of {len(block_ids)} blocks "
                f"in cache {tuple(cache.shape)}"
            )
        index = torch.tensor(block_ids[: kv.shape[2]], device=cache.device)
        cache.index_copy_(2, index, kv.to(device=cache.device, dtype=cache.dtype))

    def add_prefilled_request(
        self,
        reservation_id: str,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        request_id: str | None = None,
    ) -> str:
        """Start decoding a request whose KV for every token but the last already sits in a reservation.

        ``output_token_ids`` holds at least the first token sampled by the prefill worker.
        """
        request_id = request_id or reservation_id
        token_ids = self.validate_prompt(None, prompt_token_ids, sampling_params)
        if not output_token_ids:
            raise ValueError("output_token_ids: a prefilled request needs its first sampled token")
        self._validate_resume(token_ids, output_token_ids[:-1], sampling_params, False)
        head = self._new_request(request_id, token_ids, sampling_params, output_token_ids)
        self.kv_cache_manager.adopt(reservation_id, head)
        self.groups[request_id] = RequestGroup(head, self.tokenizer)
        self.scheduler.add_running(head)
        return request_id

    def _new_request(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        output_token_ids: Sequence[int],
        prompt: str | None = None,
    ) -> Request:
        """A request's first sample (its forks come later) under a request id not yet in use."""
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            block_size=self.config.cache.block_size,
            generator=self._seeded_generator(params, 0),
            prompt=prompt,
            pending_forks=params.n - 1,
            fork_generators=[self._seeded_generator(params, i) for i in range(1, params.n)],
            output_token_ids=list(output_token_ids),
        )

    def validate_prompt(
        self, prompt: str | None, prompt_token_ids: Sequence[int] | None, params: SamplingParams
    ) -> list[int]:
        """Token ids of a prompt, or ValueError naming what is wrong with it."""
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("prompt: either a prompt string or prompt_token_ids is required")
            if self.tokenizer is None:
                raise ValueError("prompt: a text prompt needs a tokenizer; pass prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        token_ids = [int(t) for t in prompt_token_ids]
        if not token_ids:
            raise ValueError("prompt: the prompt is empty")
        vocab = self.hf_config.vocab_size
        params.check_token_ids(vocab)
        if any(t < 0 or t >= vocab for t in token_ids):
            raise ValueError(f"prompt_token_ids: token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens is too long for max_model_len {self.max_model_len} "
                "(it must leave room for at least one generated token)"
            )
        return token_ids

    def abort_request(self, request_id: str) -> None:
        """Finish a request and all its samples now, returning every block at once."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for sample in group.samples:
            if not sample.is_finished:
                self.scheduler.finish(sample, RequestStatus.FINISHED_ABORTED)
                self.stats_recorder.on_finish(sample)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def stats(self) -> EngineStats:
        """A snapshot of load, KV-cache occupancy and the cumulative counters (engine thread only)."""
        pool, kv, recorder = self.kv_cache_manager.pool, self.kv_cache_manager, self.stats_recorder
        return EngineStats(
            total_blocks=pool.num_blocks,
            free_blocks=pool.num_free_blocks,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            num_requests=len(self.groups),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.num_queries,
            prefix_cache_hits=kv.num_hits,
            prefill_tokens=recorder.prefill_tokens,
            generation_tokens=recorder.generation_tokens,
        )

    # ----------------------------------------------------------------- stepping
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Run one scheduled step; return the current output of each request that changed.

        ``only_finished``: only requests that finished this step (offline callers that do not stream skip
        building a cumulative output per request per step).
        """
        step = self.scheduler.schedule()
        if step.is_empty:
            return []
        started = time.monotonic()
        result = self.runner.execute(step)
        self.scheduler.on_step_done(step)
        outputs = self._process(step, result, only_finished)
        self.stats_recorder.on_step(step, result, started)
        return outputs

    def _process(self, step: SchedulerOutput, result: RunnerOutput, only_finished: bool) -> list[RequestOutput]:
        touched: dict[str, RequestGroup] = {}
        for item in step.scheduled:
            request = item.request
            group = self.groups[request.group_id]
            if request.request_id in result.prompt_logprobs:
                request.prompt_logprobs.extend(result.prompt_logprobs[request.request_id])
            for sample, (token, logprobs) in self._samples_for(request, result):
                self._append_token(group, sample, token, logprobs)
            touched[group.request_id] = group
        outputs = [group.to_output() for group in touched.values() if group.finished or not only_finished]
        for group in touched.values():
            if group.finished:
                del self.groups[group.request_id]
        return outputs

    def _samples_for(self, request: Request, result: RunnerOutput) -> list[tuple[Request, tuple]]:
        """Pair each sampled token with its sample; forks happen here when the prompt is done."""
        sampled = result.sampled.get(request.request_id, [])
        if not sampled:
            return []
        samples = [request]
        for index in range(1, len(sampled)):
            child = request.fork(index, request.fork_generators[index - 1])
            self.kv_cache_manager.fork(request, child)
            self.scheduler.add_running(child)
            self.groups[request.group_id].add_sample(child)
            samples.append(child)
        if len(sampled) > 1:
            request.pending_forks = 0
        return list(zip(samples, sampled, strict=True))

    def _append_token(self, group: RequestGroup, sample: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        sample.append_output_token(token, logprobs)
        status = self._token_stop_status(sample, token)
        if group.append_text(sample) and status is None:
            status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            if group.export_kv:
                group.exported_kv = self._gather_kv(sample)
            self.scheduler.finish(sample, status)
            group.finalize(sample)

    def _gather_kv(self, request: Request) -> torch.Tensor:
        """A contiguous copy of the KV of every computed token's block (the last one may be partial)."""
        block_ids = self.kv_cache_manager.block_ids(request.request_id)
        num_blocks = -(-request.num_computed_tokens // self.config.cache.block_size)
        cache = self.runner.kv_cache
        return cache.index_select(2, torch.tensor(block_ids[:num_blocks], device=cache.device))

    def _token_stop_status(self, sample: Request, token: int) -> RequestStatus | None:
        params = sample.sampling_params
        if sample.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                sample.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token in sample.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and sample.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if sample.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ----------------------------------------------------------------- setup helpers
    def _capture_decode_graphs(self, kv_cache: torch.Tensor) -> DecodeGraphs | None:
        """CUDA graphs for decode steps up to min(max_num_seqs, 512) sequences; None on CPU or when eager."""
        if self.device.type != "cuda" or self.config.model.enforce_eager:
            return None
        block_size = self.config.cache.block_size
        graphs = DecodeGraphs(
            self.model,
            kv_cache,
            block_size,
            max_batch=min(self.config.scheduler.max_num_seqs, 512),
            max_blocks_per_seq=-(-self.max_model_len // block_size),
            device=self.device,
        )
        graphs.capture()
        return graphs

    def _load_tokenizer(self):
        if self.config.model.skip_tokenizer_init:
            return None
        source = self.config.model.tokenizer or self.model_path
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            if self.config.model.tokenizer:
                raise ValueError(f"tokenizer: cannot load {source!r}: {error}") from error
            logger.warning("no tokenizer in %s; only token-id prompts will work", source)
            return None

    def _eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.hf_config.eos_token_id, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list | tuple):
                ids.update(int(t) for t in source)
        return frozenset(ids)

    def _resolve_max_model_len(self, num_blocks: int) -> int:
        model_limit = int(getattr(self.hf_config, "max_position_embeddings", 2048))
        wanted = self.config.model.max_model_len or model_limit
        if wanted > model_limit:
            raise ValueError(f"max_model_len {wanted} exceeds the model's max_position_embeddings {model_limit}")
        capacity = num_blocks * self.config.cache.block_size
        if wanted > capacity:
            logger.warning("max_model_len %d lowered to the KV cache capacity of %d tokens", wanted, capacity)
            wanted = capacity
        sched = self.config.scheduler
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < wanted:
            raise ValueError(
                f"max_num_batched_tokens {sched.max_num_batched_tokens} must be at least "
                f"max_model_len {wanted} when chunked prefill is disabled"
            )
        return wanted

    def _seeded_generator(self, params: SamplingParams, sample_index: int) -> torch.Generator | None:
        """Sample i of a seeded request draws from its own generator seeded seed + i."""
        if params.seed is None:
            return None
        return torch.Generator().manual_seed(params.seed + sample_index)

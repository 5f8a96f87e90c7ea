"""The engine: one model on one device, stepping scheduler -> runner -> outputs; it owns nothing global.

LLMEngine is the public entry point and wires its collaborators: model_loading (startup), request_validation,
request_lifecycle (admission, forks, aborts), sampled_tokens (per-step results, stops) and kv_transfer
(the disaggregated pools' reservations and KV import/export).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from common.config import EngineConfig
from common.engine.block_pool import BlockPool
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.kv_transfer import KVTransfer
from common.engine.model_loading import load_model_and_kv_cache, log_engine_ready
from common.engine.model_runner import ModelRunner
from common.engine.output_processor import RequestGroup
from common.engine.outputs import RequestOutput
from common.engine.request_lifecycle import RequestLifecycle
from common.engine.request_validation import RequestValidator
from common.engine.sampled_tokens import SampledTokenApplier
from common.engine.sampler import Sampler
from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import Scheduler
from common.engine.stats import EngineStats, EngineStatsRecorder


class LLMEngine:
    """Continuous-batching engine over one model on one device.

    ``add_request`` validates everything before touching any state, so a bad request raises
    ``ValueError`` and leaves every running request undisturbed.
    """

    def __init__(self, config: EngineConfig) -> None:
        started = time.perf_counter()
        self.config = config
        loaded = load_model_and_kv_cache(config)
        self.device, self.model_path, self.hf_config = loaded.device, loaded.model_path, loaded.hf_config
        self.tokenizer, self.dtype, self.model = loaded.tokenizer, loaded.dtype, loaded.model
        self.max_model_len, self.eos_token_ids, self.memory = loaded.max_model_len, loaded.eos_token_ids, loaded.memory
        block_size = config.cache.block_size
        pool = BlockPool(loaded.memory.num_kv_blocks, config.cache.enable_prefix_caching)
        self.kv_cache_manager = KVCacheManager(pool, block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager)
        self.generator = torch.Generator().manual_seed(config.model.seed)
        self.runner = ModelRunner(
            self.model, loaded.kv_cache, block_size, self.device, Sampler(self.generator), loaded.decode_graphs
        )
        self.stats_recorder = EngineStatsRecorder()
        self.validator = RequestValidator(self.tokenizer, self.hf_config.vocab_size, self.max_model_len)
        self.requests = RequestLifecycle(
            self.scheduler, self.kv_cache_manager, self.stats_recorder, self.tokenizer, self.eos_token_ids, block_size
        )
        self.kv_transfer = KVTransfer(self.kv_cache_manager, loaded.kv_cache, self.requests, self.validator)
        self.sampled_tokens = SampledTokenApplier(self.requests, self.kv_transfer, self.max_model_len)
        self.load_seconds = time.perf_counter() - started
        log_engine_ready(loaded, block_size, self.load_seconds)

    @property
    def groups(self) -> dict[str, RequestGroup]:
        """Live requests by id (each group holds its ``n`` samples)."""
        return self.requests.groups

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
        token_ids = self.validator.validate_prompt(prompt, prompt_token_ids, params)
        self.validator.validate_resume(token_ids, output_token_ids, params, export_kv)
        return self.requests.add(request_id, token_ids, params, output_token_ids, prompt, export_kv)

    def validate_prompt(
        self, prompt: str | None, prompt_token_ids: Sequence[int] | None, params: SamplingParams
    ) -> list[int]:
        """Token ids of a prompt, or ValueError naming what is wrong with it."""
        return self.validator.validate_prompt(prompt, prompt_token_ids, params)

    def abort_request(self, request_id: str) -> None:
        """Finish a request and all its samples now, returning every block at once."""
        self.requests.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests.groups)

    # ----------------------------------------------------------------- disaggregation (see KVTransfer)
    def reserve_blocks(self, reservation_id: str, num_tokens: int) -> list[int]:
        """Pin blocks for ``num_tokens`` tokens of arriving KV; ValueError when the pool cannot supply them now."""
        return self.kv_transfer.reserve_blocks(reservation_id, num_tokens)

    def release_reservation(self, reservation_id: str) -> None:
        """Return an unused reservation's blocks (lease expired, transfer failed, request aborted)."""
        self.kv_transfer.release_reservation(reservation_id)

    @property
    def kv_cache(self) -> torch.Tensor:
        """The KV cache [layers, 2, blocks, block_size, kv_heads, head_dim]. Off the engine thread, write only
        blocks you own (an unadopted reservation's: see ``common.transfer.block_writer``)."""
        return self.runner.kv_cache

    def import_kv(self, reservation_id: str, kv: torch.Tensor) -> None:
        """Write verified KV ([layers, 2, blocks, block_size, heads, dim]) into a reservation's blocks."""
        self.kv_transfer.import_kv(reservation_id, kv)

    def add_prefilled_request(
        self,
        reservation_id: str,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        request_id: str | None = None,
    ) -> str:
        """Start decoding a request whose KV for every token but the last already sits in a reservation."""
        return self.kv_transfer.add_prefilled_request(
            reservation_id, prompt_token_ids, output_token_ids, sampling_params, request_id
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
        outputs = self.sampled_tokens.apply(step, result, only_finished)
        self.stats_recorder.on_step(step, result, started)
        return outputs

    def stats(self) -> EngineStats:
        """A snapshot of load, KV-cache occupancy and the cumulative counters (engine thread only)."""
        return self.stats_recorder.snapshot(self.scheduler, len(self.requests.groups))

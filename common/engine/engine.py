"""The engine: one model on one device, stepping scheduler -> runner -> outputs; it owns nothing global.

LLMEngine is the public entry point and wires its collaborators: model_loading (startup), request_validation,
request_lifecycle (admission, forks, aborts), sampled_tokens (per-step results, stops) and kv_transfer
(the disaggregated pools' reservations and KV import/export).

Async scheduling (the default): ``step`` schedules and launches step N+1, then applies step N's tokens, so the
host's work (scheduling, input preparation, detokenizing, stop checks, outputs) overlaps the GPU's. The
scheduler counts N's tokens as pending; N+1 takes them on the device. Invariants:
- A request that finishes (or is aborted) while a later step holds a row for it simply has that row's
  result dropped; the row only ever wrote KV into blocks the request owned when it was scheduled.
- Such blocks may be free while that step still runs: a KV reservation that gets one waits for the step
  first (``reserve_blocks``), because imports write from another stream or process.
- A step with a request whose next step needs the host to have its tokens (``Request.needs_host_tokens``: a
  prompt about to fork its n samples, a prefill export) is applied before the next one is scheduled.
Greedy output is identical either way; only a stop is noticed one step later (one discarded row).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from collections.abc import Sequence

import torch

from common.config import EngineConfig
from common.engine.block_pool import BlockPool
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.kv_transfer import KVBlocks, KVTransfer
from common.engine.model_loading import LoadedModel, load_model_and_kv_cache, log_engine_ready
from common.engine.model_runner import LaunchedStep, ModelRunner
from common.engine.output_processor import RequestGroup
from common.engine.outputs import RequestOutput
from common.engine.request_lifecycle import RequestLifecycle
from common.engine.request_validation import RequestValidator
from common.engine.sampled_tokens import SampledTokenApplier
from common.engine.sampler import Sampler
from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import Scheduler, SchedulerOutput
from common.engine.spec.draft_model import DraftModelProposer
from common.engine.spec.speculator import Speculator
from common.engine.stats import EngineStats, EngineStatsRecorder
from common.engine.structured import GrammarCompiler
from common.engine.tensor_parallel import LeaderModel, ShardedKVBlocks, TensorParallelLeader, kv_head_shards


class LLMEngine:
    """Continuous-batching engine over one model on one device.

    ``add_request`` validates everything before touching any state, so a bad request raises
    ``ValueError`` and leaves every running request undisturbed.

    ``tensor_parallel_size`` > 1: this process is rank 0 (it schedules and samples) and spawns the other ranks
    (see ``common.engine.tensor_parallel``); ``close`` stops them (as does garbage collection or interpreter exit).
    """

    def __init__(self, config: EngineConfig) -> None:
        started = time.perf_counter()
        self._in_flight: LaunchedStep | None = None
        self.config = config
        self.tensor_parallel: TensorParallelLeader | None = None
        self._stop_workers: weakref.finalize | None = None
        loaded = self._load(config)
        self.device, self.model_path, self.hf_config = loaded.device, loaded.model_path, loaded.hf_config
        self.tokenizer, self.dtype, self.model = loaded.tokenizer, loaded.dtype, loaded.model
        self.max_model_len, self.eos_token_ids, self.memory = loaded.max_model_len, loaded.eos_token_ids, loaded.memory
        block_size = config.cache.block_size
        pool = BlockPool(loaded.memory.num_kv_blocks, config.cache.enable_prefix_caching)
        self.kv_cache_manager = KVCacheManager(pool, block_size)
        self.generator = torch.Generator().manual_seed(config.model.seed)
        draft_proposer = self._draft_proposer(loaded)
        spec_config = config.scheduler.speculative_config
        self.speculator = None
        if spec_config is not None:
            forget = draft_proposer.forget if draft_proposer is not None else None
            self.speculator = Speculator(spec_config, self.max_model_len, forget)
        self.lora = loaded.lora  # --enable-lora: the adapters (None without)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager, self.speculator, self.lora)
        self.runner = ModelRunner(
            self._runner_model(loaded),
            loaded.kv_cache,
            block_size,
            self.device,
            Sampler(self.generator),
            loaded.decode_graphs,
            draft_proposer,
            loaded.verify_graphs,
            self.tensor_parallel.send_block_copies if self.tensor_parallel is not None else None,
            self.lora.pool if self.lora is not None else None,
        )
        self.stats_recorder = EngineStatsRecorder()
        self.grammars = GrammarCompiler(self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids)
        if self.device.type == "cuda":  # the first constrained request then does not stall the loop; on CPU the
            self.grammars.prepare_in_background()  # table build would take a core from the engine itself
        self.validator = RequestValidator(self.tokenizer, self.hf_config.vocab_size, self.max_model_len, self.grammars)
        self.requests = RequestLifecycle(
            self.scheduler,
            self.kv_cache_manager,
            self.stats_recorder,
            self.tokenizer,
            self.eos_token_ids,
            block_size,
            self.grammars,
        )
        self.kv_transfer = KVTransfer(
            self.kv_cache_manager, loaded.kv_cache, self.requests, self.validator, self._kv_blocks(loaded)
        )
        self.sampled_tokens = SampledTokenApplier(
            self.requests, self.kv_transfer, self.max_model_len, self.stats_recorder.speculation, self.speculator
        )
        self.load_seconds = time.perf_counter() - started
        log_engine_ready(loaded, block_size, self.load_seconds)

    def _load(self, config: EngineConfig) -> LoadedModel:
        """The model (this rank's shard under tensor parallelism, the other ranks started and loading alongside)."""
        if config.model.tensor_parallel_size == 1:
            return load_model_and_kv_cache(config)
        leader = self.tensor_parallel = TensorParallelLeader(config)
        self._stop_workers = weakref.finalize(self, leader.shutdown)
        try:
            return leader.run(load_model_and_kv_cache, config, leader.group)
        except BaseException:
            self.close()
            raise

    def _runner_model(self, loaded: LoadedModel):
        """The model as the runner calls it: tensor-parallel rank 0 first tells the other ranks what to run."""
        leader = self.tensor_parallel
        if leader is None:
            return loaded.model
        for name, graphs in (("decode", loaded.decode_graphs), ("verify", loaded.verify_graphs)):
            if graphs is not None:
                graphs.before_replay = functools.partial(leader.send_replay, name)
        return LeaderModel(loaded.model, leader)

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any; the engine cannot step afterwards. Safe to call twice."""
        if self._stop_workers is not None:
            self._stop_workers()

    def _kv_blocks(self, loaded: LoadedModel) -> KVBlocks | None:
        """Under tensor parallelism KV export/import gathers and scatters the ranks' heads (whole-model layout)."""
        leader = self.tensor_parallel
        if leader is None:
            return None
        return ShardedKVBlocks(leader, loaded.kv_cache, kv_head_shards(loaded.hf_config, leader.group.world_size))

    def _draft_proposer(self, loaded: LoadedModel) -> DraftModelProposer | None:
        """Speculation with a draft model: its cache mirrors the target's blocks (sized together at load)."""
        if loaded.draft is None:
            return None
        config = self.config
        return DraftModelProposer(
            loaded.draft,
            loaded.memory.num_kv_blocks,
            config.cache.block_size,
            self.max_model_len,
            self.generator,
            config.scheduler.max_num_batched_tokens,
        )

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
        lora_name: str | None = None,
    ) -> str:
        """Queue one request (its ``n`` samples share the prompt's blocks). Returns its id.

        ``output_token_ids`` resumes a request that already generated tokens elsewhere (they are
        recomputed with the prompt and count towards max_tokens). ``export_kv`` gathers the KV of
        every computed token into the final RequestOutput before the blocks are freed (prefill pool).
        ``lora_name``: a loaded LoRA adapter to run under (``add_lora``, ``--lora-modules``); None: the base model.
        """
        params = sampling_params or SamplingParams()
        self.check_lora_name(lora_name)
        if lora_name is not None and export_kv:
            raise ValueError("lora_request: LoRA requests cannot export KV to another pool yet")
        token_ids = self.validator.validate_prompt(prompt, prompt_token_ids, params)
        self.validator.validate_resume(token_ids, output_token_ids, params, export_kv)
        return self.requests.add(request_id, token_ids, params, output_token_ids, prompt, export_kv, lora_name)

    # ----------------------------------------------------------------- LoRA adapters
    def check_lora_name(self, lora_name: str | None) -> None:
        """ValueError unless ``lora_name`` is None or an adapter new requests may use."""
        if lora_name is None:
            return
        if self.lora is None:
            raise ValueError(f"lora_request: {lora_name!r}, but this engine serves no LoRA adapters "
                             "(start it with enable_lora / --enable-lora)")
        self.lora.check(lora_name)

    def add_lora(self, name: str, path: str) -> None:
        """Load the PEFT adapter folder ``path`` under ``name`` (read and checked now: ValueError saying why not)."""
        self._lora_adapters("add_lora").add(name, path)

    def remove_lora(self, name: str) -> bool:
        """Unload ``name``: True when gone now; False when requests already admitted with it finish first (new
        ones are refused from now on). ValueError when it is not loaded."""
        return self._lora_adapters("remove_lora").remove(name)

    def list_loras(self) -> list[str]:
        """The adapters new requests may use."""
        return self.lora.names() if self.lora is not None else []

    def _lora_adapters(self, what: str):
        if self.lora is None:
            raise ValueError(f"{what}: this engine serves no LoRA adapters (start it with enable_lora / --enable-lora)")
        return self.lora

    def validate_prompt(
        self, prompt: str | None, prompt_token_ids: Sequence[int] | None, params: SamplingParams
    ) -> list[int]:
        """Token ids of a prompt, or ValueError naming what is wrong with it."""
        return self.validator.validate_prompt(prompt, prompt_token_ids, params)

    def abort_request(self, request_id: str) -> None:
        """Finish a request and all its samples now, returning every block at once."""
        self.requests.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        """Live requests, or a launched step whose results are still to be applied."""
        return bool(self.requests.groups) or self._in_flight is not None

    @property
    def step_in_flight(self) -> bool:
        """A launched step's results are still to come: the next ``step`` returns them, do not back off."""
        return self._in_flight is not None

    # ----------------------------------------------------------------- disaggregation (see KVTransfer)
    def reserve_blocks(self, reservation_id: str, num_tokens: int) -> list[int]:
        """Pin blocks for ``num_tokens`` tokens of arriving KV; ValueError when the pool cannot supply them now.

        Returns only once no launched step can still write any of them (a block freed while a step that had
        a row for its owner is in flight waits for that step).
        """
        block_ids = self.kv_transfer.reserve_blocks(reservation_id, num_tokens)
        if self._in_flight is not None and not self.kv_cache_manager.recently_freed.isdisjoint(block_ids):
            self._in_flight.wait()
        return block_ids

    def release_reservation(self, reservation_id: str) -> None:
        """Return an unused reservation's blocks (lease expired, transfer failed, request aborted)."""
        self.kv_transfer.release_reservation(reservation_id)

    @property
    def kv_cache(self) -> torch.Tensor:
        """The KV cache [layers, 2, blocks, block_size, kv_heads, head_dim]. Off the engine thread, write only
        blocks you own (an unadopted reservation's: see ``common.transfer.block_writer``). Under tensor
        parallelism this is rank 0's heads only: import through ``import_kv`` (it scatters to every rank)."""
        return self.runner.kv_cache

    def import_kv(self, reservation_id: str, kv: torch.Tensor) -> None:
        """Write verified KV ([layers, 2, blocks, block_size, heads, dim], every KV head of the model) into a
        reservation's blocks (under tensor parallelism each rank keeps its heads)."""
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
        started = time.perf_counter()
        previous, self._in_flight = self._in_flight, None
        self.kv_cache_manager.recently_freed.clear()  # only a step launched from now on can write what is freed
        step = self.scheduler.schedule()
        launched = None if step.is_empty else self._launch(step, previous)
        outputs = self._apply(previous, only_finished) if previous is not None else []
        if launched is None:
            return outputs
        if self.config.scheduler.async_scheduling and not _needs_host_tokens(step):
            self._in_flight = launched
            self._time_decode_step(step, previous is not None, started)
            return outputs
        outputs = _latest_per_request(outputs + self._apply(launched, only_finished))
        self._time_decode_step(step, True, started)
        return outputs

    def _time_decode_step(self, step: SchedulerOutput, waited: bool, started: float) -> None:
        """Tell the speculator what a pure-decode step took (one that waited for a step's tokens: in steady
        async state each step waits for the previous one, so its wall time is the step period)."""
        if self.speculator is None or not waited:
            return
        if any(item.num_new_tokens - len(item.spec_token_ids) != 1 for item in step.scheduled):
            return
        speculative = any(item.spec_token_ids for item in step.scheduled)
        self.speculator.on_step(speculative, len(step.scheduled), time.perf_counter() - started)

    def finish_in_flight(self) -> list[RequestOutput]:
        """Apply the launched step, if any, without launching another (an offline caller that is done)."""
        launched, self._in_flight = self._in_flight, None
        return self._apply(launched, only_finished=False) if launched is not None else []

    def _launch(self, step: SchedulerOutput, previous: LaunchedStep | None) -> LaunchedStep:
        launched = self.runner.launch(step, previous)
        self.scheduler.on_step_done(step)
        for item in step.scheduled:
            item.request.num_pending_tokens += item.completes_sequence
        return launched

    def _apply(self, launched: LaunchedStep, only_finished: bool) -> list[RequestOutput]:
        """Bring a launched step's tokens to the host and apply them to the requests still live."""
        result = launched.resolve()
        for item in launched.step.scheduled:
            item.request.num_pending_tokens -= item.completes_sequence
        step = launched.step
        if any(item.request.is_finished for item in step.scheduled):  # stopped or aborted meanwhile
            step = dataclasses.replace(step, scheduled=tuple(i for i in step.scheduled if not i.request.is_finished))
        outputs = self.sampled_tokens.apply(step, result, only_finished)
        self.stats_recorder.on_step(step, result, launched.started)
        return outputs

    def stats(self) -> EngineStats:
        """A snapshot of load, KV-cache occupancy and the cumulative counters (engine thread only)."""
        return self.stats_recorder.snapshot(self.scheduler, len(self.requests.groups))


def _needs_host_tokens(step: SchedulerOutput) -> bool:
    return any(item.request.needs_host_tokens for item in step.scheduled)


def _latest_per_request(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One output per request (outputs are cumulative: the later one wins), in first-seen order."""
    if len(outputs) < 2:
        return outputs
    latest = {output.request_id: output for output in outputs}
    return list(latest.values()) if len(latest) < len(outputs) else outputs

"""One frozen, composed configuration for the engine and the services: the settings table.

Every field is declared once here with ``setting(default, help=...)`` (see ``common.settings``); the ``tandem``
flags, their ``TANDEM_*`` environment variables and the keyword arguments of ``LLM(...)`` are derived from these
declarations. Every component receives the part of this config it needs; nothing reads globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from common.settings import SettingValueError, parse_bytes, parse_csv, setting

DEFAULT_MODEL = "smollm2"


def parse_speculative_config(value: Any) -> Any:
    """JSON text or a dict -> ``common.speculative_config.SpeculativeConfig`` (pydantic, imported only when used)."""
    from common.speculative_config import SpeculativeConfig

    try:
        return SpeculativeConfig.parse(value)
    except ValueError as exc:
        raise SettingValueError(str(exc)) from None


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how: model id/path, numeric type, device, length limit."""

    model: str = setting(DEFAULT_MODEL, help="name, HF folder, GGUF file or HF id (default: %(default)s)")
    tokenizer: str | None = setting(None, help="tokenizer folder (default: the model's own)", cli=False)
    dtype: str = setting("auto", help="default: %(default)s", choices=("auto", "float32", "float16", "bfloat16"))
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    max_model_len: int | None = setting(None, help="context limit (default: the model's)")
    load_format: str = setting("auto", choices=("auto", "dummy"),
                               help="dummy = random weights from the model's config (default: %(default)s)")
    seed: int = setting(0, help="seed of dummy weights and of unseeded sampling", cli=False)
    skip_tokenizer_init: bool = setting(False, help="token ids in and out only", cli=False)
    download_dir: str | None = setting(None, help="model conversion/download cache (default: ~/.cache/tandem)")
    enforce_eager: bool = setting(False, help="no CUDA graphs for decode steps")
    quantization: str | None = setting(None, choices=("fp8",),
                                       help="fp8: e4m3 weights with per-channel scales, quantized at load (an FP8 "
                                            "checkpoint runs FP8 without it) (default: the checkpoint's dtype)")
    tensor_parallel_size: int = setting(1, metavar="N",
                                        help="split the model over N processes (GPUs cuda:I..I+N-1 from --device's "
                                             "index, NCCL; or N CPU processes, gloo) (default: %(default)s)")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing: a byte budget on CPU, a fraction of GPU memory on CUDA."""

    block_size: int = setting(16, help="KV block size in tokens (default: %(default)s)")
    enable_prefix_caching: bool = setting(True, flag="--no-prefix-caching", negated=True,
                                          help="turn the prefix cache off")
    kv_cache_memory: int | None = setting(None, parse=parse_bytes, metavar="BYTES",
                                          help="KV cache budget, e.g. 536870912 or 512MiB (default: engine's choice)")
    gpu_memory_utilization: float = setting(0.9, metavar="FRACTION",
                                            help="cap on this GPU's memory in use, counting other processes "
                                                 "(default: %(default)s; --kv-cache-memory wins)")
    num_gpu_blocks_override: int | None = setting(None, help="exact KV block count (tests)", cli=False)
    cpu_kv_cache_memory_default: int = setting(512 * 1024 * 1024, parse=parse_bytes, cli=False,
                                               help="KV budget on CPU when --kv-cache-memory is not set")
    kv_cache_dtype: str = setting("auto", choices=("auto", "fp8", "fp8_e4m3"),
                                  help="KV cache element type: auto = the model's dtype; fp8 (= fp8_e4m3) stores "
                                       "e4m3 with per-layer K/V scales from the checkpoint (else 1.0): twice the "
                                       "tokens per byte; prefill and decode pools must agree (default: %(default)s)")


@dataclass(frozen=True)
class SchedulerConfig:
    """Iteration-level batching limits."""

    max_num_seqs: int = setting(256, help="default: %(default)s")
    max_num_batched_tokens: int = setting(2048, help="token budget of one step (default: %(default)s)")
    enable_chunked_prefill: bool = setting(True, help="split long prompts over steps", cli=False)
    async_scheduling: bool = setting(True, flag="--no-async-scheduling", negated=True,
                                     help="schedule each step only after the previous one's tokens reached the "
                                          "host (by default the host prepares step N+1 while the GPU runs N)")
    speculative_config: Any = setting(None, parse=parse_speculative_config, metavar="JSON",
                                      help="speculative decoding, vLLM's JSON: '{\"method\": \"ngram\", "
                                           "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4}' "
                                           "(also draft_model, eagle, eagle3 with \"model\"; default: off)")

    def __post_init__(self) -> None:
        if self.speculative_config is not None:  # LLM(speculative_config=dict) and JSON text alike
            object.__setattr__(self, "speculative_config", parse_speculative_config(self.speculative_config))


def parse_lora_modules(value: Any) -> tuple[tuple[str, str], ...]:
    """'a=/p/a b=/p/b' or 'a=/p/a,b=/p/b' (text), a NAME=PATH list or a {name: path} dict -> ((name, path), ...).

    Names must be unique; paths may not hold spaces or commas in the text form.
    """
    if isinstance(value, dict):
        items = [f"{name}={path}" for name, path in value.items()]
    elif isinstance(value, str):
        items = value.replace(",", " ").split()
    else:
        items = [item if isinstance(item, str) else "=".join(item) for item in value]
    modules = tuple(_lora_module(item) for item in items)
    names = [name for name, _ in modules]
    if len(set(names)) != len(names):
        raise SettingValueError(f"LoRA adapter names must be unique: {', '.join(names)}")
    return modules


def _lora_module(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise SettingValueError(f"not a LoRA module NAME=PATH: {item!r} (try sql=/adapters/sql-lora)")
    return name.strip(), path.strip()


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving, with vLLM's flags and defaults: which PEFT adapters, how many on the GPU and the host.

    Part of ``EngineConfig``: the engine applies adapters per request (see the README, Multi-LoRA).
    """

    enable_lora: bool = setting(False, help="serve LoRA adapters (--lora-modules) beside the base model")
    lora_modules: tuple[tuple[str, str], ...] = setting((), parse=parse_lora_modules, metavar="NAME=PATH ...",
                                                        help="PEFT adapter folders clients name as models, "
                                                             "space- or comma-separated (default: none)")
    max_loras: int = setting(1, help="adapters resident on the GPU at once (default: %(default)s)")
    max_lora_rank: int = setting(16, help="highest adapter rank (default: %(default)s)")
    max_cpu_loras: int | None = setting(None, help="adapters kept in host memory (default: --max-loras)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_modules", parse_lora_modules(self.lora_modules))  # LLM(lora_modules=dict)
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            if getattr(self, name) < 1:
                raise SettingValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_cpu_loras < self.max_loras:
            raise SettingValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")

    @property
    def adapter_paths(self) -> dict[str, str]:
        return dict(self.lora_modules)

    def check_names_against(self, served_model_name: str) -> None:
        """Adapter names are model ids clients send, so none may be the base model's."""
        if served_model_name in self.adapter_paths:
            raise SettingValueError(f"LoRA adapter name {served_model_name!r} is the base model's name")


# The engine's parts, in the order the command line lists their flags.
ENGINE_PARTS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "lora": LoRAConfig,
}


@dataclass(frozen=True)
class EngineConfig:
    """The whole engine's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    @classmethod
    def from_kwargs(cls, **settings: Any) -> EngineConfig:
        """``LLM(...)``'s flat keyword arguments (any field of the parts) -> the composed config."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in ENGINE_PARTS}
        owner = {f.name: part for part, part_cls in ENGINE_PARTS.items() for f in fields(part_cls)}
        for name, value in settings.items():
            if name not in owner:
                raise TypeError(f"unknown engine setting {name!r}; the settings are: {', '.join(sorted(owner))}")
            parts[owner[name]][name] = value
        return cls(**{part: ENGINE_PARTS[part](**values) for part, values in parts.items()})

    def to_kwargs(self) -> dict[str, Any]:
        """The inverse of ``from_kwargs``: every engine setting by its field name."""
        return {f.name: getattr(getattr(self, part), f.name) for part, cls in ENGINE_PARTS.items() for f in fields(cls)}


@dataclass(frozen=True)
class CoordConfig:
    """Redis coordination: registry keys live under ``<namespace>:``; a worker is alive iff its key exists."""

    redis_url: str = setting("redis://127.0.0.1:6379/0", env_aliases=("REDIS_URL",), help="default: %(default)s")
    namespace: str = setting("tandem", help="Redis key prefix (default: %(default)s)")
    heartbeat_s: float = setting(1.0, help="default: %(default)s")
    ttl_s: float = setting(5.0, help="registry key lifetime without a heartbeat (default: %(default)s)")


@dataclass(frozen=True)
class TransferConfig:
    """KV shipping between pools: ``auto`` picks nccl for CUDA->CUDA on different GPUs, grpc otherwise."""

    transport: str = setting("auto", choices=("auto", "grpc", "nccl"),
                             help="KV transport between the pools (default: %(default)s)")
    grpc_chunk_bytes: int = setting(4 * 1024 * 1024, parse=parse_bytes, cli=False, help="gRPC KV message size")
    grpc_streams: int = setting(1, cli=False, help="parallel gRPC streams (own TCP connections) per KV transfer")
    grpc_host_pool_bytes: int = setting(512 * 1024 * 1024, parse=parse_bytes, cli=False,
                                        help="idle page-locked gRPC KV staging memory kept for reuse, per process")
    timeout_s: float = setting(60.0, cli=False, help="one KV transfer's time limit")
    reservation_lease_s: float = setting(30.0, cli=False, help="how long reserved KV blocks wait for their transfer")


@dataclass(frozen=True)
class WorkerConfig:
    """One prefill or decode worker process."""

    role: str = setting("decode", help="prefill | decode (the subcommand)", cli=False)
    host: str = setting("127.0.0.1", help="bind address (default: %(default)s)")
    port: int = setting(0, help="gRPC port; 0 = any free port (default: %(default)s)")
    advertise_host: str | None = setting(None, help="address other processes dial (default: --host)")
    worker_id: str | None = setting(None, help="registry id (default: generated)")
    drain_timeout_s: float = setting(30.0, help="on SIGTERM, how long in-flight work may take (default: %(default)s)")
    metrics_port: int = setting(0, help="HTTP port on --host for /metrics, /health and /ready (0 = any free port; "
                                        "default: %(default)s)")
    engine_in_thread: bool = setting(False, help="decode: run the engine on a thread of the worker process instead "
                                                 "of its own process (they then share one GIL); prefill always does")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one worker process is configured with (from flags or environment)."""

    engine: EngineConfig
    worker: WorkerConfig
    coord: CoordConfig
    transfer: TransferConfig


@dataclass(frozen=True)
class RouterConfig:
    """The router: where it listens and how it weighs workers (scores in [0, 1])."""

    host: str = setting("127.0.0.1", help="bind address (default: %(default)s)")
    port: int = setting(8000, help="default: %(default)s")
    weight_load: float = setting(1.0, help="default: %(default)s")
    weight_free_blocks: float = setting(1.0, help="default: %(default)s")
    weight_prefix_hits: float = setting(2.0, help="default: %(default)s")
    local_prefill_max_tokens: int = setting(
        32, help="shorter uncached prompts are prefilled on the decode worker (default: %(default)s)")
    max_retries: int = setting(3, help="default: %(default)s")
    auto_prefill_ttft_ms: float = setting(
        0.0, help="prefill on the decode worker when every prefill worker's predicted wait for this prompt (its "
                  "queued prompt tokens over its measured rate) exceeds this many ms; 0 = only short prompts "
                  "(default: %(default)s)")
    local_prefill_budget_tokens: int = setting(
        4096, help="prompt tokens a decode worker may be prefilling at once under --auto-prefill-ttft-ms when "
                   "--slo-tpot-ms is 0 (default: %(default)s)")
    slo_tpot_ms: float = setting(
        0.0, help="TPOT target: under --auto-prefill-ttft-ms a decode worker prefills a prompt only while its "
                  "predicted TPOT stays within it, and a busier one sends prompts its cache holds to an idle "
                  "prefill pool; 0 = unknown (default: %(default)s)")
    local_prefill_tokens_per_s: float = setting(
        0.0, help="a decode worker's prefill rate until the router has measured it; 0 = the prefill workers' "
                  "measured rate (default: %(default)s)")
    local_prefill_spread_tokens: int = setting(
        256, help="output tokens of a running stream over which --slo-tpot-ms averages a local prefill's stall "
                  "(a request's TPOT is its mean time per token) (default: %(default)s)")
    served_model_name: str | None = setting(None, help="model id clients send (default: --model)")
    api_keys: tuple[str, ...] = setting((), parse=parse_csv, secret=True,
                                        help="comma-separated accepted API keys (default: none = open)")
    rate_limit_rpm: int | None = setting(None, help="requests per minute per API key (default: unlimited)")
    rate_limit_tpm: int | None = setting(None, help="tokens per minute per API key (default: unlimited)")
    max_request_body: int = setting(
        32 * 1024 * 1024, parse=parse_bytes, metavar="BYTES",
        help="largest request body; a larger one gets 413 before it is read (default: 32 MiB: a 1M-token "
             "context as text or as JSON token ids, about 4 and 8 MB, fits with room, while one body cannot "
             "make the router buffer, parse and tokenize hundreds of MB)")
    max_running: int = setting(1024, help="requests streamed at once by this router (default: %(default)s)")
    max_waiting: int = setting(1024, help="admission queue length; beyond it requests get 429 (default: %(default)s)")
    processes: int = setting(1, help="router processes sharing --port (each a core's worth of streaming; queue "
                                     "limits are per process) (default: %(default)s)")
    reuse_port: bool = setting(False, help="bind with SO_REUSEPORT so other processes can share the port")
    tool_call_parser: str | None = setting(None, choices=("hermes", "llama3_json", "mistral"),
                                           help="format of the model's tool calls, for tool_choice \"auto\" and "
                                                "the default tool prompt (default: hermes' format, no auto)")
    enable_auto_tool_choice: bool = setting(False, help="allow tool_choice \"auto\" (needs --tool-call-parser)")
    chat_template: str | None = setting(None, metavar="PATH",
                                        help="Jinja chat template replacing the model's: a file, or the template "
                                             "text itself (as vLLM's --chat-template) (default: the model's)")


@dataclass(frozen=True)
class ServeConfig:
    """`tandem serve`: the local cluster's shape (its router and engine settings come from the tables above)."""

    prefill: int = setting(1, metavar="N", help="prefill workers (default: %(default)s)")
    decode: int = setting(1, metavar="M", help="decode workers (default: %(default)s)")
    prefill_tp: int = setting(1, metavar="A", help="tensor-parallel size of each prefill worker: A GPUs each "
                                                   "(A processes on CPU) (default: %(default)s)")
    decode_tp: int = setting(1, metavar="B", help="tensor-parallel size of each decode worker: B GPUs each "
                                                  "(B processes on CPU) (default: %(default)s)")
    ready_timeout_s: float = setting(120.0, help="how long each process may take to come up (default: %(default)s)")
    log_dir: str | None = setting(None, help="folder for the processes' logs (default: a new temporary folder)")
    autoscale: bool = setting(False, help="run the planner in-process: it starts and drains workers of each pool "
                                          "to meet the SLO it is given in --planner-args")
    planner_args: str = setting("", metavar="FLAGS",
                                help="`tandem planner` flags for --autoscale, e.g. \"--profile p.json "
                                     "--slo-ttft-ms 500 "
                                     "--slo-tpot-ms 30 --max-decode 4\" (the router URL is the cluster's)")


@dataclass(frozen=True)
class PlannerConfig:
    """`tandem planner`: where it reads the load, the SLO it plans for, its pacing, limits and the Deployments."""

    router_url: str = setting("http://127.0.0.1:8000",
                              help="router whose /prometheus/targets lists the workers (default: %(default)s)")
    prometheus_url: str | None = setting(None, help="read the load from this Prometheus HTTP API instead")
    profile: str | None = setting(None, metavar="FILE",
                                  help="capacity profile JSON, or a pd_goodput --result-json (required)")
    slo_ttft_ms: float = setting(1000.0, help="TTFT target (default: %(default)s)")
    slo_tpot_ms: float = setting(50.0, help="TPOT target (default: %(default)s)")
    interval_s: float = setting(15.0, help="seconds between decisions (default: %(default)s)")
    window_s: float = setting(60.0, help="Prometheus rate/quantile window (default: %(default)s)")
    cooldown_s: float = setting(180.0, help="a lower count must be wanted this long before each step down "
                                            "(default: %(default)s)")
    band: float = setting(0.2, help="hysteresis: scale down only if the lower count keeps the predicted latency "
                                    "within (1 - band) x SLO (default: %(default)s)")
    min_prefill: int = setting(1, help="default: %(default)s")
    max_prefill: int = setting(8, help="default: %(default)s")
    min_decode: int = setting(1, help="default: %(default)s")
    max_decode: int = setting(8, help="default: %(default)s")
    k8s_namespace: str = setting("default", help="namespace of the worker Deployments (default: %(default)s)")
    prefill_deployment: str = setting("tandem-prefill", help="default: %(default)s")
    decode_deployment: str = setting("tandem-decode", help="default: %(default)s")
    dry_run: bool = setting(False, help="print each decision; scale nothing")
    iterations: int = setting(0, help="stop after this many decisions; 0 = run until stopped (default: %(default)s)")
    metrics_port: int = setting(0, help="serve the planner's /metrics on this port (all interfaces); 0 = off "
                                        "(default: %(default)s)")
    model: str = setting("", help="the `model` label on the planner's metrics (default: empty)")
    unplaceable_after_s: float = setting(120.0, help="a pool short of available replicas this long counts as "
                                                     "unplaceable (default: %(default)s)")
    correction: bool = setting(True, flag="--no-correction", negated=True,
                               help="plan from the profile alone: no correction by the observed / predicted "
                                    "latency, no queue-growth scale-up")
    correction_min: float = setting(0.5, help="lowest correction factor (default: %(default)s)")
    correction_max: float = setting(4.0, help="highest correction factor (default: %(default)s)")
    correction_alpha: float = setting(0.5, help="EWMA weight of each new observed / predicted ratio "
                                                "(default: %(default)s)")
    settle_s: float = setting(60.0, help="after a pool's count changes, observations this soon do not correct "
                                         "it (old count in the window, workers warming up) (default: %(default)s)")
    queue_intervals: int = setting(3, help="a prefill queue rising this many settled intervals in a row adds a "
                                           "replica (default: %(default)s)")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1, 4,16' -> (1, 4, 16): positive and strictly increasing."""
    try:
        sizes = tuple(int(item) for item in parse_csv(text))
    except ValueError:
        raise SettingValueError(f"not a comma-separated list of batch sizes: {text!r} (try 1,4,16,64)") from None
    if not sizes or sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise SettingValueError(f"batch sizes must be positive and increasing: {text!r}")
    return sizes


@dataclass(frozen=True)
class ProfileConfig:
    """`tandem profile`: the workload it measures the engine under, how long it measures, and where it writes."""

    prompt_tokens: int = setting(2048, help="prompt length of the workload (default: %(default)s)")
    output_tokens: int = setting(256, help="output length of the workload; with --prompt-tokens, the context one "
                                           "decode stream holds, which sets max_batch (default: %(default)s)")
    prefill_batches: int = setting(3, help="timed prefill batches; the median rate counts (default: %(default)s)")
    prefill_batch_size: int = setting(4, help="prompts per prefill batch (default: %(default)s)")
    decode_batches: tuple[int, ...] = setting((1, 4, 16, 64), parse=parse_batch_sizes, metavar="B1,B2,...",
                                              help="running batch sizes to time decode at, cut at what the KV "
                                                   "cache holds (default: 1,4,16,64)")
    decode_steps: int = setting(16, help="timed decode steps per batch size (default: %(default)s)")
    warmup_steps: int = setting(4, help="untimed decode steps before them (default: %(default)s)")
    prompt_seed: int = setting(0, help="seed of the random prompt tokens (default: %(default)s)")
    ttft_overhead_ms: float = setting(0.0, help="TTFT the serving path adds outside the engine (routing, KV "
                                                "transfer); not measured here, written as is (default: %(default)s)")
    output: str = setting("tandem-profile.json", metavar="FILE", help="where to write the profile "
                                                                      "(default: %(default)s)")

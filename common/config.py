"""One frozen, composed configuration for the engine and (later) the services.

Every component receives the part of this config it needs; nothing reads globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how: model id/path, numeric type, device, length limit."""

    model: str = DEFAULT_MODEL
    tokenizer: str | None = None  # defaults to the model's own folder
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    load_format: str = "auto"  # auto | dummy (random weights from config, for benchmarks)
    seed: int = 0
    skip_tokenizer_init: bool = False
    download_dir: str | None = None  # model conversion/download cache; default ~/.cache/tandem
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps (debugging, profiling)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing: a byte budget on CPU, a fraction of GPU memory on CUDA."""

    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: int | None = None  # bytes; wins over gpu_memory_utilization when set
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None  # exact block count (tests)
    cpu_kv_cache_memory_default: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class SchedulerConfig:
    """Iteration-level batching limits."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True


@dataclass(frozen=True)
class EngineConfig:
    """The whole engine's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(frozen=True)
class CoordConfig:
    """Redis coordination: registry keys live under ``<namespace>:``; a worker is alive iff its key exists."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "tandem"
    heartbeat_s: float = 1.0
    ttl_s: float = 5.0


@dataclass(frozen=True)
class TransferConfig:
    """KV shipping between pools: ``auto`` picks nccl for CUDA->CUDA on different GPUs, grpc otherwise."""

    transport: str = "auto"  # auto | grpc | nccl
    grpc_chunk_bytes: int = 4 * 1024 * 1024
    timeout_s: float = 60.0
    reservation_lease_s: float = 30.0


@dataclass(frozen=True)
class WorkerConfig:
    """One prefill or decode worker process."""

    role: str = "decode"  # prefill | decode
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    advertise_host: str | None = None  # address others dial; defaults to host
    worker_id: str | None = None
    drain_timeout_s: float = 30.0
    metrics_port: int = 0  # HTTP /metrics, /health, /ready on host; 0 = pick a free port


@dataclass(frozen=True)
class RouterConfig:
    """The router: where it listens and how it weighs workers (scores in [0, 1])."""

    host: str = "127.0.0.1"
    port: int = 8000
    weight_load: float = 1.0
    weight_free_blocks: float = 1.0
    weight_prefix_hits: float = 2.0
    local_prefill_max_tokens: int = 32  # shorter uncached prompts are prefilled on the decode worker
    max_retries: int = 3
    served_model_name: str | None = None  # the id clients send as `model`; defaults to the --model value
    api_keys: tuple[str, ...] = ()  # empty = no authentication
    rate_limit_rpm: int | None = None  # per API key, enforced across router replicas through Redis
    rate_limit_tpm: int | None = None
    max_running: int = 1024  # requests this router streams at once
    max_waiting: int = 1024  # admission queue length; beyond it: 429
    processes: int = 1  # router processes sharing the port (SO_REUSEPORT); queue limits are per process
    reuse_port: bool = False  # bind with SO_REUSEPORT (set for the children of --processes N)

"""The typed record each worker publishes in Redis and routers read back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as the registry sees it. Live fields are refreshed by every heartbeat."""

    worker_id: str
    role: Role
    model: str
    grpc_address: str  # host:port of the worker's gRPC server (worker RPCs + KV transfer service)
    metrics_port: int = 0  # HTTP /metrics, /health, /ready on the grpc_address host; 0 = none (older worker)
    device: str = "cpu"  # cpu | cuda:N
    host_id: str = ""  # machine identity: nccl needs both ends on one host (or a reachable fabric)
    block_size: int = 16
    max_model_len: int = 0  # 0 = unknown (older worker)
    total_blocks: int = 0
    free_blocks: int = 0
    running: int = 0
    waiting: int = 0
    tpot_ms: float = 0.0  # recent mean engine time per step with output (a stream's time per token); 0 = unknown
    draining: bool = False
    started_at: float = 0.0
    version: str = "0.1.0"

    @property
    def load(self) -> int:
        return self.running + self.waiting

    def to_redis(self) -> dict[str, str]:
        return {key: str(int(value)) if isinstance(value, bool) else str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_redis(cls, raw: dict[str | bytes, str | bytes]) -> WorkerInfo:
        """Parse a Redis hash; unknown fields (newer workers) are ignored, missing ones take defaults."""
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()}
        values: dict[str, object] = {}
        for field in fields(cls):
            if field.name not in data:
                continue
            text = data[field.name]
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            if kind == "int":
                values[field.name] = int(text)
            elif kind == "float":
                values[field.name] = float(text)
            elif kind == "bool":
                values[field.name] = text not in ("0", "", "False", "false")
            else:
                values[field.name] = text
        return cls(**values)

"""Tensor parallelism across processes: rank 0 is the engine's process, ranks 1..N-1 are workers it spawns.

Every rank loads its shard and sizes, allocates and (on CUDA) captures the same way, in lockstep: startup runs the
same collectives in the same order on every rank (the KV block count is the minimum over the ranks). Then rank 0
alone schedules and samples; before each forward it sends the workers a typed message over a local socket
(``EagerForward``, ``GraphReplay``, ``ComputeLogits``, ``CopyBlocks``, ``Shutdown``) and broadcasts the step's
input tensors over the group, so every rank runs the same forward (and the same collectives) on the same inputs.

KV handoff (the disaggregated pools): ``ShardedKVBlocks`` shows rank 0's engine the whole-model KV layout. Reading
blocks (``GatherKV``) has the first rank holding each KV head send its heads to rank 0 (a head replicated over
several ranks travels once); writing blocks (``ScatterKV``) has rank 0 send each rank the heads it holds (replicas
included). So what a tensor-parallel prefill worker ships, and what a decode worker accepts, is exactly what a
TP=1 engine would: any prefill TP can feed any decode TP.

Invariants:
- A worker exits when rank 0 goes away: its socket closes (a worker waiting for a message sees EOF) and a
  watchdog thread notices the parent is gone (a worker stuck in a collective).
- A worker that dies makes rank 0's next send or collective fail; rank 0 then raises ``TensorParallelError``
  naming the rank and how it ended, and keeps raising it (never hangs: collectives have a timeout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

import torch

from common.config import EngineConfig
from common.distributed.group import TensorParallelGroup, create_group, create_store
from common.engine.cuda_graphs import DecodeGraphs
from common.engine.kv_cache_manager import BlockCopy
from common.engine.model_loading import LoadedModel, load_model_and_kv_cache, resolve_device
from common.models.loader import resolve_model_path
from common.models.parallel_layers import HeadShard, shard_heads
from kernels.attention_metadata import AttentionMetadata
from kernels.kv_cache import index_copy_blocks

logger = logging.getLogger(__name__)

AUTHKEY_ENV = "TANDEM_TP_AUTHKEY"
CONNECT_TIMEOUT_S = 120.0  # a spawned worker must connect back within this (it imports torch first)
SHUTDOWN_TIMEOUT_S = 10.0
_WATCHDOG_PERIOD_S = 1.0
_EXIT_GRACE_S = 3.0
_REPO_ROOT = Path(__file__).resolve().parents[2]


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot run another step."""


# ---------------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class WorkerStart:
    """Rank 0 -> a spawned worker, once: who it is, where the group meets, what to load."""

    rank: int
    world_size: int
    store_port: int
    config: EngineConfig  # its model is rank 0's resolved folder, its device this rank's


@dataclass(frozen=True)
class EagerForward:
    """Run the model on inputs broadcast right after this message (shapes below; one packed int64 tensor)."""

    num_tokens: int
    num_seqs: int
    table_width: int
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]
    block_size: int
    num_decode_splits: int | None


@dataclass(frozen=True)
class GraphReplay:
    """Replay the ``graphs`` ("decode" or "verify") graph of ``bucket`` on static inputs broadcast after this."""

    graphs: str
    bucket: int


@dataclass(frozen=True)
class ComputeLogits:
    """Take part in the logits of ``num_rows`` hidden rows broadcast after this (the LM head's gather)."""

    num_rows: int


@dataclass(frozen=True)
class CopyBlocks:
    """Copy-on-write: copy each (src, dst) block of the KV cache, before the next forward."""

    pairs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class GatherKV:
    """Send rank 0 this rank's KV heads of ``block_ids`` (only the first rank holding a head sends it)."""

    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class ScatterKV:
    """Receive this rank's KV heads of ``block_ids`` from rank 0 and write them into those blocks."""

    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class WorkerFailed:
    """A worker -> rank 0, before it exits on an error."""

    rank: int
    error: str


StepMessage = EagerForward | GraphReplay | ComputeLogits | CopyBlocks | GatherKV | ScatterKV | Shutdown
_GATHER_TAG, _SCATTER_TAG = 11, 12  # point-to-point tags (gloo matches on them; NCCL keeps per-pair order)


# ---------------------------------------------------------------------------------------------------- KV heads


def kv_head_shards(hf_config: Any, world_size: int) -> list[HeadShard]:
    """Each rank's heads, as the model shards them (``shard_heads``)."""
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    return [shard_heads(num_heads, num_kv_heads, rank, world_size) for rank in range(world_size)]


def kv_head_senders(shards: list[HeadShard]) -> list[int]:
    """The ranks other than 0 that send their KV heads on a gather: the first holder of each head range not
    already on rank 0 (replicas of a head hold the same bytes)."""
    seen = {(shards[0].kv_start, shards[0].kv_end)}
    senders = []
    for rank, shard in enumerate(shards[1:], start=1):
        if (shard.kv_start, shard.kv_end) not in seen:
            seen.add((shard.kv_start, shard.kv_end))
            senders.append(rank)
    return senders


def _shard_shape(cache: torch.Tensor, num_blocks: int) -> tuple[int, ...]:
    layers, two, _, block_size, heads, head_dim = cache.shape
    return (layers, two, num_blocks, block_size, heads, head_dim)


def _block_index(cache: torch.Tensor, block_ids: tuple[int, ...] | list[int]) -> torch.Tensor:
    return torch.tensor(list(block_ids), dtype=torch.int64, device=cache.device)


# ---------------------------------------------------------------------------------------------------- inputs


def pack_inputs(input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
    """One int64 tensor holding an eager forward's device inputs (one broadcast instead of six)."""
    parts = (input_ids, positions, metadata.slot_mapping, metadata.query_start_loc, metadata.seq_lens,
             metadata.block_tables.reshape(-1))
    return torch.cat([part.to(torch.int64) for part in parts])


def unpack_inputs(
    packed: torch.Tensor, message: EagerForward
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """The inverse of ``pack_inputs`` on a worker."""
    tokens, seqs = message.num_tokens, message.num_seqs
    sizes = [tokens, tokens, tokens, seqs + 1, seqs, seqs * message.table_width]
    ids, positions, slots, query_start, seq_lens, tables = packed.split(sizes)
    metadata = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=query_start.to(torch.int32),
        seq_lens=seq_lens.to(torch.int32),
        block_tables=tables.to(torch.int32).reshape(seqs, message.table_width),
        query_lens_cpu=message.query_lens_cpu,
        seq_lens_cpu=message.seq_lens_cpu,
        block_size=message.block_size,
        num_decode_splits=message.num_decode_splits,
    )
    return ids, positions, metadata


def packed_size(message: EagerForward) -> int:
    return 3 * message.num_tokens + 2 * message.num_seqs + 1 + message.num_seqs * message.table_width


# ---------------------------------------------------------------------------------------------------- rank 0


@dataclass
class _Worker:
    rank: int
    process: subprocess.Popen
    conn: Connection | None = None


class TensorParallelLeader:
    """Rank 0's side: spawns the workers, tells them what to run, and turns a lost rank into a clear error.

    Call the ``send_*`` methods right before rank 0 runs the same thing itself."""

    def __init__(self, config: EngineConfig) -> None:
        world_size = config.model.tensor_parallel_size
        self.device = resolve_device(config.model.device)
        _check_devices(self.device, world_size)
        model_path = resolve_model_path(config.model.model, config.model.download_dir)  # converted once, here
        self._store = create_store(world_size)
        self._failure: TensorParallelError | None = None
        self._workers: list[_Worker] = []
        authkey = secrets.token_bytes(32)
        with socket.create_server(("127.0.0.1", 0)) as server:
            for rank in range(1, world_size):
                self._workers.append(_Worker(rank, _spawn_worker(server.getsockname()[1], authkey)))
            try:
                self._connect(server, authkey)
            except BaseException:
                self.shutdown()
                raise
        for worker in self._workers:
            worker_config = _rank_config(config, model_path, self.device, worker.rank)
            self._send_to(worker, WorkerStart(worker.rank, world_size, self._store.port, worker_config))
        self.group = self._guard(create_group, 0, world_size, self._store.port, self.device, self._store)

    @property
    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    # ----------------------------------------------------------------- per step
    def send_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> None:
        message = EagerForward(
            num_tokens=input_ids.shape[0],
            num_seqs=metadata.seq_lens.shape[0],
            table_width=metadata.block_tables.shape[1],
            query_lens_cpu=metadata.query_lens_cpu,
            seq_lens_cpu=metadata.seq_lens_cpu,
            block_size=metadata.block_size,
            num_decode_splits=metadata.num_decode_splits,
        )
        self._send(message)
        self._guard(self.group.broadcast, pack_inputs(input_ids, positions, metadata))

    def send_replay(self, name: str, graphs: DecodeGraphs, bucket: int) -> None:
        """Before rank 0 replays ``graphs``' ``bucket``: the workers replay theirs on rank 0's static inputs."""
        self._send(GraphReplay(name, bucket))
        for tensor in graphs.static_inputs(bucket):
            self._guard(self.group.broadcast, tensor)

    def send_logits(self, hidden: torch.Tensor) -> None:
        self._send(ComputeLogits(hidden.shape[0]))
        self._guard(self.group.broadcast, hidden.contiguous())

    def send_block_copies(self, copies: tuple[BlockCopy, ...]) -> None:
        self._send(CopyBlocks(tuple((copy.src, copy.dst) for copy in copies)))

    def gather_kv(self, cache: torch.Tensor, block_ids: list[int], shards: list[HeadShard]) -> torch.Tensor:
        """The whole-model KV of ``block_ids``: rank 0's heads from ``cache``, the others' from their ranks."""
        self._send(GatherKV(tuple(block_ids)))
        return self._guard(self._gather_kv, cache, block_ids, shards)

    def scatter_kv(self, cache: torch.Tensor, block_ids: list[int], kv: torch.Tensor, shards: list[HeadShard]) -> None:
        """Whole-model ``kv`` (the cache's dtype) into ``block_ids`` of every rank, each keeping its heads."""
        self._send(ScatterKV(tuple(block_ids)))
        self._guard(self._scatter_kv, cache, block_ids, kv, shards)

    def _gather_kv(self, cache: torch.Tensor, block_ids: list[int], shards: list[HeadShard]) -> torch.Tensor:
        layers, two, _, block_size, _, head_dim = cache.shape
        full = (layers, two, len(block_ids), block_size, shards[-1].kv_end, head_dim)
        kv = torch.empty(full, dtype=cache.dtype, device=cache.device)
        kv[..., shards[0].kv_start : shards[0].kv_end, :] = cache.index_select(2, _block_index(cache, block_ids))
        for rank in kv_head_senders(shards):
            shard = shards[rank]
            piece = torch.empty(full[:4] + (shard.num_kv_heads, head_dim), dtype=cache.dtype, device=cache.device)
            kv[..., shard.kv_start : shard.kv_end, :] = self.group.recv(piece, rank, _GATHER_TAG)
        return kv

    def _scatter_kv(self, cache: torch.Tensor, block_ids: list[int], kv: torch.Tensor, shards: list[HeadShard]) -> None:
        kv = kv.to(device=cache.device, dtype=cache.dtype)
        for rank, shard in enumerate(shards[1:], start=1):
            self.group.send(kv[..., shard.kv_start : shard.kv_end, :].contiguous(), rank, _SCATTER_TAG)
        own = kv[..., shards[0].kv_start : shards[0].kv_end, :].contiguous()
        index_copy_blocks(cache, _block_index(cache, block_ids), own)

    def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` (rank 0's own forward or logits), a collective failure turned into TensorParallelError."""
        return self._guard(fn, *args)

    # ----------------------------------------------------------------- lifetime
    def shutdown(self) -> None:
        """Stop every worker (politely, then by force); safe to call more than once."""
        for worker in self._workers:
            if worker.conn is not None:
                with contextlib.suppress(OSError, EOFError, ValueError):
                    worker.conn.send(Shutdown())
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        for worker in self._workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
            if worker.conn is not None:
                worker.conn.close()
                worker.conn = None

    # ----------------------------------------------------------------- plumbing
    def _connect(self, server: socket.socket, authkey: bytes) -> None:
        """Accept each worker's connection (they say their rank first), watching that none died meanwhile."""
        server.settimeout(0.5)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        for _ in self._workers:
            while True:
                self._raise_if_dead("while starting")
                if time.monotonic() > deadline:
                    raise TensorParallelError(f"tensor-parallel workers did not connect within {CONNECT_TIMEOUT_S} s")
                try:
                    sock, _ = server.accept()
                    break
                except TimeoutError:
                    continue
            sock.settimeout(None)
            conn = Connection(sock.detach())
            deliver_challenge(conn, authkey)
            answer_challenge(conn, authkey)
            pid = conn.recv()
            worker = next((w for w in self._workers if w.process.pid == pid), None)
            if worker is None:
                conn.close()
                raise TensorParallelError(f"an unknown process (pid {pid}) connected as a tensor-parallel worker")
            worker.conn = conn

    def _send(self, message: StepMessage) -> None:
        for worker in self._workers:
            self._send_to(worker, message)

    def _send_to(self, worker: _Worker, message: Any) -> None:
        if self._failure is not None:
            raise self._failure
        try:
            worker.conn.send(message)
        except (OSError, EOFError) as error:
            raise self._fail(error) from error

    def _guard(self, fn: Any, *args: Any) -> Any:
        if self._failure is not None:
            raise self._failure
        try:
            return fn(*args)
        except (RuntimeError, OSError) as error:
            if isinstance(error, TensorParallelError):
                raise
            raise self._fail(error) from error

    def _fail(self, error: BaseException) -> TensorParallelError:
        """The error to raise now and on every later call: which ranks are gone and why, else the collective's."""
        deadline = time.monotonic() + _EXIT_GRACE_S  # a dying worker's exit status lags its closed socket
        while time.monotonic() < deadline and all(worker.process.poll() is None for worker in self._workers):
            time.sleep(0.05)
        lost = [self._describe(worker) for worker in self._workers if worker.process.poll() is not None]
        reason = "; ".join(lost) if lost else f"a collective failed: {error}"
        self._failure = TensorParallelError(f"tensor-parallel engine stopped: {reason}")
        return self._failure

    def _describe(self, worker: _Worker) -> str:
        code = worker.process.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        text = f"rank {worker.rank} (pid {worker.process.pid}) {how}"
        if worker.conn is not None:
            with contextlib.suppress(OSError, EOFError):
                while worker.conn.poll(0):
                    message = worker.conn.recv()
                    if isinstance(message, WorkerFailed):
                        text += f": {message.error}"
        return text

    def _raise_if_dead(self, when: str) -> None:
        dead = [self._describe(worker) for worker in self._workers if worker.process.poll() is not None]
        if dead:
            raise TensorParallelError(f"tensor-parallel worker died {when}: {'; '.join(dead)}")


class LeaderModel:
    """Rank 0's model as the runner calls it: each forward and each logits call first tells the workers."""

    def __init__(self, model: torch.nn.Module, leader: TensorParallelLeader) -> None:
        self.model, self.leader = model, leader
        self.num_layers, self.num_heads = model.num_layers, model.num_heads
        self.num_kv_heads, self.head_dim = model.num_kv_heads, model.head_dim

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        self.leader.send_forward(input_ids, positions, metadata)
        return self.leader.run(self.model, input_ids, positions, kv_cache, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.leader.send_logits(hidden)
        return self.leader.run(self.model.compute_logits, hidden)


class ShardedKVBlocks:
    """Rank 0's whole-model view of a tensor-parallel engine's KV blocks (``KVTransfer``'s ``KVBlocks``): reads
    gather every rank's heads, writes scatter them. Runs on the engine thread, between steps (the ranks take the
    messages in order, after any forward already sent)."""

    def __init__(self, leader: TensorParallelLeader, cache: torch.Tensor, shards: list[HeadShard]) -> None:
        self.leader, self.cache, self.shards = leader, cache, shards

    @property
    def shape(self) -> tuple[int, ...]:
        layers, two, blocks, block_size, _, head_dim = self.cache.shape
        return (layers, two, blocks, block_size, self.shards[-1].kv_end, head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.cache.dtype

    def read(self, block_ids: Sequence[int]) -> torch.Tensor:
        return self.leader.gather_kv(self.cache, list(block_ids), self.shards)

    def write(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        self.leader.scatter_kv(self.cache, list(block_ids), kv, self.shards)


def _check_devices(device: torch.device, world_size: int) -> None:
    if device.type == "cuda" and device.index + world_size > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size {world_size} needs GPUs {device.index}..{device.index + world_size - 1}; "
            f"{torch.cuda.device_count()} are visible"
        )


def _rank_config(config: EngineConfig, model_path: Path, device: torch.device, rank: int) -> EngineConfig:
    """A worker's config: rank 0's resolved model folder, the next GPU (or the CPU), no tokenizer."""
    rank_device = f"cuda:{device.index + rank}" if device.type == "cuda" else "cpu"
    model = dataclasses.replace(config.model, model=str(model_path), device=rank_device, skip_tokenizer_init=True)
    return dataclasses.replace(config, model=model)


def _spawn_worker(port: int, authkey: bytes) -> subprocess.Popen:
    """A fresh interpreter (not multiprocessing: rank 0 may itself be a daemonic engine process, and a fresh
    interpreter never re-runs the user's script)."""
    env = dict(os.environ)
    env[AUTHKEY_ENV] = authkey.hex()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "common.engine.tensor_parallel_worker", str(port)]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, cwd=str(_REPO_ROOT))


# ---------------------------------------------------------------------------------------------------- workers


class _WorkerLoop:
    """A worker's side: run what rank 0 says, on this rank's shard, until Shutdown or rank 0 is gone."""

    def __init__(self, loaded: LoadedModel, group: TensorParallelGroup, conn: Connection) -> None:
        self.loaded, self.group, self.conn = loaded, group, conn
        self.graphs = {"decode": loaded.decode_graphs, "verify": loaded.verify_graphs}
        self.sends_kv = group.rank in kv_head_senders(kv_head_shards(loaded.hf_config, group.world_size))

    @torch.inference_mode()
    def run(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return  # rank 0 is gone
            if isinstance(message, Shutdown):
                return
            self.handle(message)

    def handle(self, message: StepMessage) -> None:
        loaded = self.loaded
        if isinstance(message, EagerForward):
            packed = torch.empty(packed_size(message), dtype=torch.int64, device=loaded.device)
            input_ids, positions, metadata = unpack_inputs(self.group.broadcast(packed), message)
            loaded.model(input_ids, positions, loaded.kv_cache, metadata)
        elif isinstance(message, GraphReplay):
            graphs = self.graphs[message.graphs]
            for tensor in graphs.static_inputs(message.bucket):
                self.group.broadcast(tensor)
            graphs.replay(message.bucket)
        elif isinstance(message, ComputeLogits):
            hidden_size = loaded.hf_config.hidden_size
            rows = torch.empty((message.num_rows, hidden_size), dtype=loaded.dtype, device=loaded.device)
            loaded.model.compute_logits(self.group.broadcast(rows))
        elif isinstance(message, CopyBlocks):
            for src, dst in message.pairs:
                loaded.kv_cache[:, :, dst].copy_(loaded.kv_cache[:, :, src])
        elif isinstance(message, GatherKV):
            self.send_kv(message.block_ids)
        elif isinstance(message, ScatterKV):
            self.receive_kv(message.block_ids)
        else:
            raise TypeError(f"unknown tensor-parallel message {message!r}")


    def send_kv(self, block_ids: tuple[int, ...]) -> None:
        if self.sends_kv:
            cache = self.loaded.kv_cache
            self.group.send(cache.index_select(2, _block_index(cache, block_ids)), 0, _GATHER_TAG)

    def receive_kv(self, block_ids: tuple[int, ...]) -> None:
        cache = self.loaded.kv_cache
        piece = torch.empty(_shard_shape(cache, len(block_ids)), dtype=cache.dtype, device=cache.device)
        index_copy_blocks(cache, _block_index(cache, block_ids), self.group.recv(piece, 0, _SCATTER_TAG))


def _exit_when_orphaned(parent_pid: int) -> None:
    """Watchdog thread: a worker whose rank 0 died exits even when stuck in a collective or a kernel."""
    while True:
        time.sleep(_WATCHDOG_PERIOD_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def _connect_to_leader(port: int) -> Connection:
    conn = Client(("127.0.0.1", port), authkey=bytes.fromhex(os.environ.pop(AUTHKEY_ENV)))
    conn.send(os.getpid())
    return conn


def worker_main(port: int) -> int:
    """A spawned rank: connect to rank 0, load this rank's shard in lockstep with it, then serve its steps."""
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    conn = _connect_to_leader(port)
    start: WorkerStart = conn.recv()
    try:
        device = resolve_device(start.config.model.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        group = create_group(start.rank, start.world_size, start.store_port, device)
        loaded = load_model_and_kv_cache(start.config, group)
        _WorkerLoop(loaded, group, conn).run()
    except Exception as error:
        logger.exception("tensor-parallel rank %d failed", start.rank)
        with contextlib.suppress(OSError, EOFError):
            conn.send(WorkerFailed(start.rank, f"{type(error).__name__}: {error}"))
        return 1
    return 0


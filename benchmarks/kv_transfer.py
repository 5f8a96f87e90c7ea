"""KV transfer micro-benchmark: raw NCCL send/recv vs our NCCL and gRPC transports, end to end.

Two processes (spawn): this one is the sender on GPU0, a child is the receiver on GPU1. Sizes are the KV of
an N-token prompt of the Llama-3.1-8B shape (32 layers x 2 x tokens x 8 kv heads x 128 dim, bf16 = 128 KiB
per token): 16, 64 and 256 MiB (= 2048 tokens) by default. For each size:
  (a) raw  : torch.distributed NCCL send/recv of the same bytes (init_process_group nccl), host-synced;
  (b) nccl : NcclKVSender.send end to end into one contiguous run of reserved block ids, the direct path
             (descriptor on the pair's persistent Control stream, per-layer piece sends in one NCCL group +
             in-band GPU checksum, recvs straight into the preallocated cache's blocks on a side stream, GPU
             verify over the pieces, event polled from the loop, placement committed, ack);
  (b') nccl_scatter: the fallback path: reserved ids in reverse order (more than 4 runs), so the bytes land
             in a fresh buffer and on_kv = the decode worker's BlockWriter scatters them into the cache;
  (b'') nccl_xfer: the fallback's transport alone (reverse ids, on_kv does not scatter; still verified);
  (c) grpc : GrpcKVSender.send end to end (device->host copy, checksum, stream, verify, host->device, scatter);
  (c') grpc_xfer: the same with an on_kv that does not scatter (the transport alone, still verified).
Median over --repeats after --warmup runs; prints a table and JSON (b/a = overhead of our NCCL path).
Then, for the largest size: --inflight transfers at once (raw: queued sends, one sync; ours: asyncio.gather
of sends to the one receiver, in flight together on the pair's channel; direct, each into its own contiguous
run of blocks, and the scatter fallback; gRPC too), and the checksum alone on GPU0
(Triton kernel vs the chunked torch reference). The "handoff" line sums it up against the issue's target:
end-to-end GB/s at the largest size with 1 and --inflight in flight, each as a share of raw NCCL (>= 80%).

    python benchmarks/kv_transfer.py                 # 2-GPU host
    python benchmarks/kv_transfer.py --grpc-only     # anywhere, CPU when fewer than 2 GPUs

NCCL_NVLS_ENABLE=0 is set for both processes (NVLink multicast stays off).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ["NCCL_NVLS_ENABLE"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from common.config import TransferConfig  # noqa: E402
from common.transfer.base import KVSender, KVTransferHeader, grpc_message_options  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
NO_SCATTER = "bench-noscatter"  # reservation id that tells the benchmark's on_kv to skip its scatter
DIRECT = "bench"  # reservation id whose transfers the receiver's place() maps straight into its cache
FIRST_BLOCK = 64  # reserved ids start here (block 0.. stay untouched)
BYTES_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2  # bf16


@dataclass(frozen=True)
class Plan:
    """What both processes agree to run."""

    sizes_mib: tuple[int, ...]
    repeats: int
    warmup: int
    grpc_only: bool
    sender_device: str
    receiver_device: str
    chunk_bytes: int
    grpc_streams: int
    raw_port: int
    inflight: int

    @property
    def rounds(self) -> int:
        return self.warmup + self.repeats


def kv_shape(size_mib: int) -> tuple[int, ...]:
    """The [L, 2, blocks, block_size, H, D] shape holding ``size_mib`` MiB of 8B-shape bf16 KV."""
    tokens = size_mib * 2**20 // BYTES_PER_TOKEN
    return (LAYERS, 2, tokens // BLOCK_SIZE, BLOCK_SIZE, KV_HEADS, HEAD_DIM)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--grpc-only", action="store_true", help="skip NCCL (a, b); runs on CPU-only machines")
    parser.add_argument("--chunk-mib", type=float, default=4.0, help="gRPC chunk size")
    parser.add_argument("--grpc-streams", type=int, default=1, help="parallel gRPC streams per transfer")
    parser.add_argument("--inflight", type=int, default=4, help="transfers in flight for the pipelined run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def make_plan(args: argparse.Namespace) -> Plan:
    gpus = torch.cuda.device_count() >= 2
    if not gpus and not args.grpc_only:
        raise SystemExit("needs 2 CUDA devices (or pass --grpc-only)")
    return Plan(
        sizes_mib=tuple(args.sizes_mib),
        repeats=args.repeats,
        warmup=args.warmup,
        grpc_only=args.grpc_only,
        sender_device="cuda:0" if gpus else "cpu",
        receiver_device="cuda:1" if gpus else "cpu",
        chunk_bytes=int(args.chunk_mib * 2**20),
        grpc_streams=args.grpc_streams,
        raw_port=_free_port(),
        inflight=args.inflight,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- receiver process


def receiver_main(plan: Plan, port_queue: Any, stop: Any) -> None:
    """Child process: raw NCCL recv loop first, then a gRPC server with our KVReceiver until ``stop``."""
    if plan.receiver_device.startswith("cuda"):
        torch.cuda.set_device(plan.receiver_device)
    if not plan.grpc_only:
        raw_receive(plan)
    asyncio.run(serve_receiver(plan, port_queue, stop))


def raw_receive(plan: Plan) -> None:
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{plan.raw_port}", rank=1, world_size=2)
    for size in plan.sizes_mib:
        buffer = torch.empty(kv_shape(size), dtype=torch.bfloat16, device=plan.receiver_device)
        for _ in range(plan.rounds):
            dist.recv(buffer, src=0)
            _sync(plan.receiver_device)
    buffers = [torch.empty(kv_shape(max(plan.sizes_mib)), dtype=torch.bfloat16, device=plan.receiver_device)]
    buffers *= plan.inflight
    for _ in range(plan.rounds):
        for buffer in buffers:
            dist.recv(buffer, src=0)
        _sync(plan.receiver_device)
    dist.destroy_process_group()


async def serve_receiver(plan: Plan, port_queue: Any, stop: Any) -> None:
    import grpc

    from common.transfer import make_receiver
    from common.transfer.block_writer import BlockWriter
    from common.transfer.placement import DirectPlacement

    shape = list(kv_shape(max(plan.sizes_mib)))
    shape[2] = FIRST_BLOCK + shape[2] * plan.inflight  # room for ids FIRST_BLOCK.. (see time_sender, time_inflight)
    writer = BlockWriter(torch.zeros(shape, dtype=torch.bfloat16, device=plan.receiver_device))

    def place(header: KVTransferHeader) -> DirectPlacement | None:
        """The decode worker's place_kv without reservations: every DIRECT transfer lands in the cache."""
        return DirectPlacement(writer.cache, _nothing, _nothing) if header.reservation_id == DIRECT else None

    async def on_kv(header: KVTransferHeader, kv: torch.Tensor) -> None:
        if header.reservation_id == NO_SCATTER:
            return  # the transport alone: kv arrived and was verified
        await asyncio.to_thread(writer.write, header.block_ids, kv)  # what the decode worker does

    config = TransferConfig(grpc_chunk_bytes=plan.chunk_bytes, grpc_streams=plan.grpc_streams)
    receiver = make_receiver(on_kv, config, plan.receiver_device, place=place)
    server = grpc.aio.server(options=grpc_message_options(plan.chunk_bytes))
    receiver.add_to_server(server)
    port_queue.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    while not stop.is_set():
        await asyncio.sleep(0.05)
    await receiver.close()
    await server.stop(grace=None)


def _nothing() -> None:
    """A benchmark placement's commit and abandon: no reservation to mark."""


# ---------------------------------------------------------------- sender (this process)


def raw_send(plan: Plan) -> dict[int, list[float]]:
    """Seconds per raw NCCL send (host-synced), per size."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{plan.raw_port}", rank=0, world_size=2)
    times: dict[int, list[float]] = {}
    for size in plan.sizes_mib:
        data = torch.randn(kv_shape(size), device=plan.sender_device).to(torch.bfloat16)
        samples = []
        for _ in range(plan.rounds):
            _sync(plan.sender_device)
            start = time.perf_counter()
            dist.send(data, dst=1)
            _sync(plan.sender_device)
            samples.append(time.perf_counter() - start)
        times[size] = samples[plan.warmup :]
    data = torch.randn(kv_shape(max(plan.sizes_mib)), device=plan.sender_device).to(torch.bfloat16)
    samples = []
    for _ in range(plan.rounds):
        _sync(plan.sender_device)
        start = time.perf_counter()
        for _ in range(plan.inflight):
            dist.send(data, dst=1)
        _sync(plan.sender_device)
        samples.append(time.perf_counter() - start)
    times[-1] = samples[plan.warmup :]  # key -1: the in-flight run of the largest size
    dist.destroy_process_group()
    return times


def reserved_ids(num_blocks: int, contiguous: bool, first: int = FIRST_BLOCK) -> list[int]:
    """One run of ids (the direct path) or the same ids in reverse order (one run per block: the fallback)."""
    ids = list(range(first, first + num_blocks))
    return ids if contiguous else ids[::-1]


async def time_sender(
    plan: Plan, sender: KVSender, address: str, reservation: str = DIRECT, contiguous: bool = True
) -> dict[int, list[float]]:
    """Seconds per end-to-end ``sender.send`` per size; every result must be ok."""
    times: dict[int, list[float]] = {}
    for size in plan.sizes_mib:
        shape = kv_shape(size)
        kv = (torch.randn(shape, device=plan.sender_device) + 3).to(torch.bfloat16)
        block_ids = reserved_ids(shape[2], contiguous)
        samples = []
        for index in range(plan.rounds):
            start = time.perf_counter()
            result = await sender.send(address, f"req-{size}-{index}", reservation, block_ids, kv)
            samples.append(time.perf_counter() - start)
            if not result.ok:
                raise RuntimeError(f"transfer of {size} MiB failed: {result.error}")
        times[size] = samples[plan.warmup :]
    return times


async def time_empty(plan: Plan, sender: KVSender, address: str) -> dict[int, list[float]]:
    """Seconds per send of an empty KV (no NCCL op, no checksum): the RPC + handler overhead alone."""
    kv = torch.empty((LAYERS, 2, 0, BLOCK_SIZE, KV_HEADS, HEAD_DIM), dtype=torch.bfloat16, device=plan.sender_device)
    samples = []
    for index in range(plan.rounds * 3):
        start = time.perf_counter()
        result = await sender.send(address, f"empty-{index}", NO_SCATTER, [], kv)
        samples.append(time.perf_counter() - start)
        if not result.ok:
            raise RuntimeError(f"empty transfer failed: {result.error}")
    return dict.fromkeys(plan.sizes_mib, samples[plan.warmup :])  # the same fixed cost, shown in every row


async def time_inflight(plan: Plan, sender: KVSender, address: str, contiguous: bool = True) -> list[float]:
    """Seconds for ``plan.inflight`` concurrent sends of the largest size (asyncio.gather); all must be ok.
    Each goes to its own run of blocks (direct) or the same ids reversed (the scatter fallback)."""
    shape = kv_shape(max(plan.sizes_mib))
    tensors = [(torch.randn(shape, device=plan.sender_device) + i).to(torch.bfloat16) for i in range(plan.inflight)]
    ids = [reserved_ids(shape[2], contiguous, FIRST_BLOCK + i * shape[2]) for i in range(plan.inflight)]
    samples = []
    for index in range(plan.rounds):
        start = time.perf_counter()
        sends = [sender.send(address, f"many-{index}-{i}", DIRECT, ids[i], t) for i, t in enumerate(tensors)]
        results = await asyncio.gather(*sends)
        samples.append(time.perf_counter() - start)
        if not all(r.ok for r in results):
            raise RuntimeError(f"in-flight transfers failed: {[r.error for r in results if not r.ok]}")
    return samples[plan.warmup :]


def time_checksum(plan: Plan) -> dict[str, float]:
    """Median ms of the checksum sums of the largest size on GPU0: Triton kernel vs chunked torch reference."""
    from common.transfer.checksum import _as_int32_words
    from kernels.checksum import checksum_sums_reference, checksum_sums_triton

    kv = torch.randn(kv_shape(max(plan.sizes_mib)), device=plan.sender_device).to(torch.bfloat16)
    words = _as_int32_words(kv)
    assert checksum_sums_triton(words).tolist() == checksum_sums_reference(words).tolist()
    out = {}
    for name, fn in (("triton", checksum_sums_triton), ("torch_ref", checksum_sums_reference)):
        samples = []
        for _ in range(plan.rounds + 10):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(words)
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        out[f"checksum_{name}_ms"] = round(statistics.median(samples[plan.warmup :]), 4)
    return out


async def run_transports(plan: Plan, address: str) -> dict[str, dict[int, list[float]]]:
    from common.transfer import make_sender

    config = TransferConfig(grpc_chunk_bytes=plan.chunk_bytes, grpc_streams=plan.grpc_streams)
    results = {}
    kinds = ["grpc"] if plan.grpc_only else ["nccl", "grpc"]
    for kind in kinds:
        sender = make_sender(kind, config, sender_id="bench-prefill", device=plan.sender_device)
        try:
            results[kind] = await time_sender(plan, sender, address)
            if kind == "nccl":
                results["nccl_scatter"] = await time_sender(plan, sender, address, contiguous=False)
                results["nccl_xfer"] = await time_sender(plan, sender, address, NO_SCATTER, contiguous=False)
                results["rpc_only"] = await time_empty(plan, sender, address)
                results["nccl"][-1] = await time_inflight(plan, sender, address)
                results["nccl_scatter"][-1] = await time_inflight(plan, sender, address, contiguous=False)
            if kind == "grpc":  # the transport alone, and several transfers sharing the one channel
                results["grpc_xfer"] = await time_sender(plan, sender, address, NO_SCATTER)
                results["grpc"][-1] = await time_inflight(plan, sender, address)
        finally:
            await sender.close()
    return results


# ---------------------------------------------------------------- report


def summarize(plan: Plan, times: dict[str, dict[int, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    for size in plan.sizes_mib:
        row: dict[str, Any] = {"size_mib": size, "tokens": size * 2**20 // BYTES_PER_TOKEN}
        for kind, per_size in times.items():
            median = statistics.median(per_size[size])
            row[f"{kind}_ms"] = round(median * 1e3, 3)
            row[f"{kind}_gbps"] = round(size * 2**20 / median / 1e9, 2)
        if "raw" in times and "nccl" in times:
            row["nccl_over_raw"] = round(row["nccl_ms"] / row["raw_ms"], 2)
        rows.append(row)
    return rows


def summarize_inflight(plan: Plan, times: dict[str, dict[int, list[float]]]) -> dict[str, Any]:
    """Aggregate GB/s of the in-flight run (largest size x ``plan.inflight``), raw vs ours."""
    total = max(plan.sizes_mib) * 2**20 * plan.inflight
    row: dict[str, Any] = {"size_mib": max(plan.sizes_mib), "inflight": plan.inflight}
    for kind in ("raw", "nccl", "nccl_scatter", "grpc"):
        if -1 in times.get(kind, {}):
            median = statistics.median(times[kind][-1])
            row[f"{kind}_ms"] = round(median * 1e3, 3)
            row[f"{kind}_gbps"] = round(total / median / 1e9, 2)
    return row


def summarize_handoff(rows: list[dict[str, Any]], inflight: dict[str, Any]) -> dict[str, Any]:
    """End-to-end GB/s at the largest size, 1 and N in flight, as shares of raw NCCL (issue target >= 0.8)."""
    largest = rows[-1]
    out: dict[str, Any] = {"size_mib": largest["size_mib"]}
    if "nccl_gbps" in largest and "raw_gbps" in largest:
        out["e2e_1_gbps"], out["raw_1_gbps"] = largest["nccl_gbps"], largest["raw_gbps"]
        out["e2e_1_share_of_raw"] = round(largest["nccl_gbps"] / largest["raw_gbps"], 3)
    if "nccl_gbps" in inflight and "raw_gbps" in inflight:
        n = inflight["inflight"]
        out[f"e2e_{n}_gbps"], out[f"raw_{n}_gbps"] = inflight["nccl_gbps"], inflight["raw_gbps"]
        out[f"e2e_{n}_share_of_raw"] = round(inflight["nccl_gbps"] / inflight["raw_gbps"], 3)
    if "grpc_gbps" in largest:
        out["grpc_gbps"] = largest["grpc_gbps"]
    return out


def print_table(rows: list[dict[str, Any]], kinds: list[str]) -> None:
    header = f"{'MiB':>5} {'tokens':>6} " + " ".join(f"{k + ' ms':>10} {k + ' GB/s':>10}" for k in kinds)
    print(header + (f" {'(b)/(a)':>8}" if "raw" in kinds and "nccl" in kinds else ""))
    for row in rows:
        line = f"{row['size_mib']:>5} {row['tokens']:>6} "
        line += " ".join(f"{row[k + '_ms']:>10.3f} {row[k + '_gbps']:>10.2f}" for k in kinds)
        print(line + (f" {row['nccl_over_raw']:>8.2f}" if "nccl_over_raw" in row else ""))


def main() -> None:
    args = parse_args()
    plan = make_plan(args)
    ctx = mp.get_context("spawn")
    port_queue, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=receiver_main, args=(plan, port_queue, stop))
    child.start()
    try:
        if plan.sender_device.startswith("cuda"):
            torch.cuda.set_device(plan.sender_device)
        times = {} if plan.grpc_only else {"raw": raw_send(plan)}
        address = f"127.0.0.1:{port_queue.get(timeout=120)}"
        times |= asyncio.run(run_transports(plan, address))
    finally:
        stop.set()
        child.join(60)
    rows = summarize(plan, times)
    report = {"plan": asdict(plan), "device": torch.cuda.get_device_name(0) if plan.sender_device != "cpu" else "cpu"}
    report["results"] = rows
    report["inflight"] = summarize_inflight(plan, times)
    if not plan.grpc_only:
        report["checksum"] = time_checksum(plan)
    report["handoff"] = summarize_handoff(rows, report.get("inflight", {}))
    print(json.dumps(report, indent=2))
    print_table(rows, list(times))
    for key in ("inflight", "checksum", "handoff"):
        if key in report:
            print(key, report[key])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

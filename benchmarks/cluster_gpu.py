"""The disaggregated cluster on a 2-GPU host: prefill on GPU 0, decode on GPU 1, KV over NCCL.

    python benchmarks/cluster_gpu.py --model PATH [--load-format dummy] [--requests 32]

Starts Redis + router + 1 prefill + 1 decode (LocalCluster splits the GPUs), sends requests through
the router, and reports: which transport shipped the KV (from the prefill worker's log), per-transfer
milliseconds, time to first token and end-to-end latency percentiles, and whether every worker's free
blocks came back. Random weights make greedy text meaningless; this checks the path, not the words.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx

from proto import worker_pb2, worker_pb2_grpc
from services.cluster import LocalCluster


def one_request(url: str, prompt_ids: list[int], max_tokens: int) -> dict:
    body = {"prompt_token_ids": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    started = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": event["error"]["message"]}
            first = first or time.perf_counter()
            tokens += len(event["token_ids"])
    return {"ttft": first - started, "e2e": time.perf_counter() - started, "tokens": tokens}


def free_blocks_back(cluster: LocalCluster) -> bool:
    for worker in cluster.workers.values():
        with grpc.insecure_channel(worker.address) as channel:
            state = worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=5)
        if state.free_blocks != state.total_blocks or state.reservations:
            return False
    return True


def transfer_lines(run_dir: Path) -> list[tuple[str, float]]:
    pattern = re.compile(r"via (\w+) in ([0-9.]+) ms")
    found = []
    for log in run_dir.glob("prefill*.log"):
        found += [(m.group(1), float(m.group(2))) for m in pattern.finditer(log.read_text())]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="tandem-gpu-"))
    worker_args = ["-v", "--load-format", args.load_format, "--dtype", args.dtype, "--transport", "auto",
                   "--gpu-memory-utilization", "0.5"]
    router_args = ["--local-prefill-max-tokens", "0"]
    with LocalCluster(args.model, 1, 1, router_port=0, worker_args=worker_args, router_args=router_args,
                      run_dir=run_dir) as cluster:
        time.sleep(2)  # one heartbeat so the router sees both workers
        prompts = [[100 + (i * 7919 + j * 104729) % 40000 for j in range(args.input_len)] for i in range(args.requests)]
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda p: one_request(cluster.router_url, p, args.output_len), prompts))
        time.sleep(1)
        leak_free = free_blocks_back(cluster)
    errors = [r["error"] for r in results if "error" in r]
    done = [r for r in results if "error" not in r]
    transfers = transfer_lines(run_dir)
    summary = {
        "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
        "all_tokens": all(r["tokens"] == args.output_len for r in done),
        "transports": sorted({kind for kind, _ in transfers}), "transfers": len(transfers),
        "transfer_ms_p50": statistics.median([ms for _, ms in transfers]) if transfers else None,
        "ttft_s_p50": statistics.median([r["ttft"] for r in done]) if done else None,
        "e2e_s_p50": statistics.median([r["e2e"] for r in done]) if done else None,
        "free_blocks_back": leak_free, "input_len": args.input_len, "output_len": args.output_len,
        "run_dir": str(run_dir),
    }
    for key, value in summary.items():
        print(f"{key:18s} {value}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""`tandem` command line: the cluster's processes, a local cluster, and the in-process engine.

Subcommands:
  prefill | decode   one worker process (gRPC), registered in Redis        -> services.worker_process.run_worker
  router             the HTTP gateway                                      -> services.router.server.main_router
  serve              Redis + router + N prefill + M decode on this machine -> services.cluster.LocalCluster
  planner            scale the prefill / decode Deployments to the SLO     -> services.planner.loop.run_planner
  profile            measure this machine's capacity: the planner's profile -> services.planner.measure.measure
  chat               chat with an in-process engine on stdin (one message a line)
  generate           one completion for one prompt, in process

The flags come from the settings table (``common.config``) through ``services.flags``; every flag also reads a
``TANDEM_*`` environment variable. This is the top layer: nothing imports it. Nothing heavy (torch, the
engine, the services) is imported until a subcommand runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

from common.config import RouterConfig
from common.settings import env_var_name, parse_bool, parse_bytes
from services.flags import (
    build_parser,
    coord_config,
    engine_argv,
    engine_config,
    known_env_vars,
    planner_config,
    profile_config,
    router_config,
    serve_config,
    settings_argv,
    transfer_config,
    worker_config,
    worker_settings,
)

if TYPE_CHECKING:
    from common.config import PlannerConfig
    from services.cluster import LocalCluster

# Re-exported: the command line's helpers, importable from the command's own module.
__all__ = ["build_parser", "chat_repl", "coord_config", "engine_argv", "engine_config", "env_var_name",
           "known_env_vars", "main", "parse_bool", "parse_bytes", "router_config", "worker_config"]

log = logging.getLogger("tandem.launch")

EXIT_WORDS = frozenset({"exit", "quit", "/exit", "/quit"})
RESET_WORDS = frozenset({"/reset", "/clear"})
EXAMPLE_BODY = '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "stream": true}'


# ---------------------------------------------------------------------------------------------------- services


def cmd_worker(args: argparse.Namespace) -> int:
    from services.worker_process import run_worker

    return run_worker(worker_settings(args))


def cmd_router(args: argparse.Namespace) -> int:
    from services.router.server import main_router

    return main_router(args.model, router_config(args), coord_config(args), transfer_config(args), args.download_dir)


def cmd_planner(args: argparse.Namespace) -> int:
    from services.planner.actuate import ScaleError
    from services.planner.loop import run_planner

    try:
        return run_planner(planner_config(args), lambda line: print(line, flush=True))
    except ValueError as exc:  # a missing or unreadable profile, limits out of order
        print(f"tandem planner: {exc}", file=sys.stderr)
        return 2
    except ScaleError as exc:  # a Deployment missing or not ours to scale: stop loudly, not retry forever
        print(f"tandem planner: {exc}", file=sys.stderr)
        return 1


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure the engine in process with the workers' engine flags; print the table, write --output."""
    from services.planner.measure import format_table, measure, source_line
    from services.planner.profile import save_profile

    config = profile_config(args)
    llm = load_engine(args)
    try:
        measured = measure(llm.engine, config, lambda line: print(f"tandem profile: {line}", file=sys.stderr))
    except ValueError as exc:  # the workload does not fit the model's length or the KV cache
        print(f"tandem profile: {exc}", file=sys.stderr)
        return 2
    save_profile(measured.profile(config.ttft_overhead_ms, source_line(llm.engine, config)), config.output)
    print(format_table(measured))
    print(f"wrote {config.output}")
    return 0


class _Shutdown(Exception):
    """SIGINT or SIGTERM asked `tandem serve` to stop."""


def _on_stop_signal(signum: int, _frame: Any) -> None:
    """First SIGINT/SIGTERM: raise _Shutdown in the main thread; later ones only say we are already stopping."""
    signal.signal(signal.SIGINT, _on_repeat_signal)
    signal.signal(signal.SIGTERM, _on_repeat_signal)
    raise _Shutdown(signal.Signals(signum).name)


def _on_repeat_signal(signum: int, _frame: Any) -> None:
    print("tandem: already stopping; waiting for the processes to exit", file=sys.stderr)


class StartupError(Exception):
    """`tandem serve` cannot start; the message is the one line the user sees (the traceback only with -v)."""


def _check_shape(args: argparse.Namespace) -> None:
    """Refuse a cluster that could only answer 503 (or is not a cluster at all)."""
    shape = serve_config(args)
    if shape.prefill < 0 or shape.decode < 0:
        raise StartupError(f"--prefill and --decode must be >= 0, got {shape.prefill} and {shape.decode}")
    if shape.prefill_tp < 1 or shape.decode_tp < 1:
        raise StartupError(f"--prefill-tp and --decode-tp must be >= 1, got {shape.prefill_tp} and {shape.decode_tp}")
    if args.tensor_parallel_size != 1:
        raise StartupError("tandem serve sets each pool's tensor parallelism on its own: give --prefill-tp and "
                           "--decode-tp instead of --tensor-parallel-size")
    if shape.decode == 0 and not args.redis_url:
        raise StartupError("--decode 0 starts no decode worker, so every request would get 503; give --decode 1 "
                           "or more (or --redis-url of a registry where decode workers run)")


def _check_port_free(host: str, port: int) -> None:
    """The router's port, bound and released here as uvicorn will bind it (SO_REUSEADDR), so a port in use is one
    clear line now instead of a router traceback later."""
    import socket

    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port} ({exc.strerror}): another tandem serve or server "
                               f"holds it? Stop it or pick another --port") from exc


def _check_redis_server(args: argparse.Namespace) -> None:
    import shutil

    from common.coord.redis_server import MISSING_MESSAGE

    if not args.redis_url and shutil.which("redis-server") is None:
        raise StartupError(f"{MISSING_MESSAGE}, or pass --redis-url of a running Redis")


def _cluster_from_args(args: argparse.Namespace) -> LocalCluster:
    from pathlib import Path

    from services.cluster import LocalCluster

    shape = serve_config(args)
    verbose = ["-v"] if args.verbose else []
    worker_args = [*engine_argv(args, skip=("--model", "--tensor-parallel-size")), "--transport", args.transport,
                   *verbose]
    # Every router setting `serve` was given (flag or TANDEM_* variable) goes on to the router; secrets (API
    # keys) through its environment. host and port are the cluster's own arguments.
    router_settings, router_env = settings_argv(RouterConfig, args, skip=("host", "port"))
    router_args = ["--transport", args.transport, *verbose, *router_settings]
    if args.download_dir:
        router_args = ["--download-dir", args.download_dir, *router_args]
    return LocalCluster(
        args.model, shape.prefill, shape.decode, args.port, args.host, worker_args, args.redis_url,
        Path(shape.log_dir) if shape.log_dir else None,
        namespace=args.namespace, router_args=router_args, router_env=router_env,
        ready_timeout_s=shape.ready_timeout_s, echo_stderr=args.verbose,  # else only in the logs
        prefill_tp=shape.prefill_tp, decode_tp=shape.decode_tp,
    )


def _print_banner(cluster: LocalCluster, stdout: IO[str]) -> None:
    counts = {role: sum(w.role == role for w in cluster.workers.values()) for role in ("prefill", "decode")}
    print(f"tandem: router listening on {cluster.router_url} ({counts['prefill']} prefill, {counts['decode']} decode; "
          f"redis {cluster.redis_url}; logs in {cluster.run_dir})", file=stdout)
    print(f"  curl -N {cluster.router_url}/generate -d '{EXAMPLE_BODY}'; echo", file=stdout)
    print("Ctrl-C stops everything.", file=stdout, flush=True)


def _supervise(cluster: LocalCluster, poll_s: float = 0.5) -> int:
    """Restart crashed children (back-off) until a stop signal; returns 1 once one keeps crashing."""
    from services.cluster import ClusterSupervisor, GaveUp

    supervisor = ClusterSupervisor(cluster, lambda line: print(f"tandem: {line}", file=sys.stderr, flush=True))
    try:
        while True:
            time.sleep(poll_s)
            supervisor.poll()
    except GaveUp as exc:
        print(f"tandem serve: {exc}", file=sys.stderr)
        return 1


def _start_failed(args: argparse.Namespace, exc: BaseException) -> int:
    """One line on stderr (the first of the error's message; with -v the traceback before it); exit code 1."""
    import traceback

    if args.verbose:
        traceback.print_exception(exc)
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    print(f"tandem serve: {lines[0]}" + ("" if args.verbose else " (-v for details)"), file=sys.stderr)
    return 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the local cluster until SIGINT/SIGTERM, restarting crashed processes; then stop every process
    (bounded) and return 0. A failure to start is one line on stderr and exit code 1."""
    from common.models.loader import resolve_model_path

    planner = _autoscale_config(args)  # a bad planner flag or profile fails before anything starts
    try:
        _check_shape(args)
        _check_redis_server(args)
        _check_port_free(args.host, args.port)
        # Resolve (convert/download) once here, so the processes do not all convert the same GGUF at once.
        print(f"tandem: model {args.model} -> {resolve_model_path(args.model, args.download_dir)}", file=sys.stderr)
        cluster = _cluster_from_args(args)
    except Exception as exc:  # noqa: BLE001 - a bad --model, a busy port, no redis-server: one line, not a trace
        return _start_failed(args, exc)
    return _run_cluster(args, cluster, planner)


def _run_cluster(args: argparse.Namespace, cluster: LocalCluster, planner: PlannerConfig | None) -> int:
    from services.cluster import ClusterError

    stop = threading.Event()
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            cluster.start()
        except (ClusterError, RuntimeError, OSError) as exc:  # start() stopped what it had started
            return _start_failed(args, exc)
        with cluster:
            _print_banner(cluster, sys.stdout)
            if planner is not None:
                _start_autoscaler(cluster, dataclasses.replace(planner, router_url=cluster.router_url), stop)
            return _supervise(cluster)
    except _Shutdown as exc:
        print(f"tandem: {exc}: stopped", file=sys.stderr)
        return 0
    finally:
        stop.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _autoscale_config(args: argparse.Namespace) -> PlannerConfig | None:
    """The planner's config for `tandem serve --autoscale` (None without it); exits 2 on a bad flag or profile."""
    from services.planner.profile import profile_from_file

    shape = serve_config(args)
    if not shape.autoscale:
        return None
    planner_args = build_parser().parse_args(["planner", *shlex.split(shape.planner_args)])
    config = planner_config(planner_args)
    try:
        if not config.profile:
            raise ValueError("--autoscale needs --planner-args with --profile FILE")
        profile_from_file(config.profile)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"tandem serve: {exc}") from None
    return config


def _start_autoscaler(cluster: LocalCluster, config: PlannerConfig, stop: threading.Event) -> threading.Thread:
    """The planner on a thread of this process, scaling the cluster's pools until ``stop`` is set."""
    from services.cluster import LocalScaler
    from services.planner.loop import run_planner

    def plan() -> None:
        try:
            run_planner(config, lambda line: print(f"tandem autoscale: {line}", file=sys.stderr, flush=True),
                        sleep=stop.wait, actuator=LocalScaler(cluster), should_stop=stop.is_set)
        except Exception:  # noqa: BLE001 - the cluster keeps serving at its current size
            log.exception("the autoscaler stopped")

    thread = threading.Thread(target=plan, name="tandem-autoscale", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------------- in process


def load_engine(args: argparse.Namespace) -> Any:
    """Build the in-process engine from CLI flags; prints the load time to stderr."""
    from common.engine import LLM

    t0 = time.perf_counter()
    llm = LLM(**engine_config(args).to_kwargs())
    print(f"tandem: loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return llm


def sampling_params(args: argparse.Namespace) -> Any:
    from common.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, top_p=args.top_p,
                          seed=args.seed, stop=tuple(args.stop or ()))


def stream_completion(llm: Any, prompt: str, params: Any) -> Iterator[str]:
    """The completion of `prompt`, piece by piece as the engine makes it (joined: what llm.generate returns).
    Closing the iterator early aborts the request, so no KV block is left behind."""
    engine = llm.engine
    request_id = engine.add_request(prompt, None, params)
    sent, finished = 0, False
    try:
        while not finished:
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                text, finished = output.outputs[0].text, output.finished
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
    finally:
        if not finished:
            engine.abort_request(request_id)
        engine.finish_in_flight()


def stream_chat(llm: Any, messages: list[dict[str, str]], params: Any) -> Iterator[str]:
    """The assistant's next turn, streamed (joined: what llm.chat returns)."""
    from common.engine.llm import render_chat

    yield from stream_completion(llm, render_chat(llm.get_tokenizer(), messages, True, None), params)


def _read_messages(stdin: IO[str], interactive: bool) -> Iterator[str]:
    """Yield stripped user lines until EOF; shows a `> ` prompt only on a terminal."""
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return
        else:
            line = stdin.readline()
            if not line:
                return
        yield line.strip()


def chat_repl(llm: Any, params: Any, stdin: IO[str], stdout: IO[str], interactive: bool,
              stream: Any = stream_chat) -> None:
    """Answer each line as the next turn of one conversation, printing the answer as it is generated
    (`stream(llm, history, params)` yields its pieces); `exit` or EOF ends, `/reset` forgets."""
    history: list[dict[str, str]] = []
    for text in _read_messages(stdin, interactive):
        if not text:
            continue
        if text.lower() in EXIT_WORDS:
            return
        if text.lower() in RESET_WORDS:
            history.clear()
            continue
        history.append({"role": "user", "content": text})
        t0 = time.perf_counter()
        pieces = []
        for piece in stream(llm, history, params):
            pieces.append(piece)
            print(piece, end="", file=stdout, flush=True)
        print(file=stdout, flush=True)
        log.debug("answered in %.2f s", time.perf_counter() - t0)
        history.append({"role": "assistant", "content": "".join(pieces)})


def cmd_chat(args: argparse.Namespace) -> int:
    llm = load_engine(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model; 'exit' or Ctrl-D quits, '/reset' starts over.", file=sys.stderr)
    chat_repl(llm, sampling_params(args), sys.stdin, sys.stdout, interactive)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    llm = load_engine(args)
    params = sampling_params(args)
    if args.stream:
        messages = [{"role": "user", "content": args.prompt}]
        pieces = stream_chat(llm, messages, params) if args.chat else stream_completion(llm, args.prompt, params)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        return 0
    if args.chat:
        outs = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        outs = llm.generate([args.prompt], params)
    print(outs[0].outputs[0].text)
    return 0


COMMANDS = {"prefill": cmd_worker, "decode": cmd_worker, "router": cmd_router, "serve": cmd_serve,
            "planner": cmd_planner, "profile": cmd_profile, "chat": cmd_chat, "generate": cmd_generate}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

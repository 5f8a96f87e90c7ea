"""`tandem` command line: the cluster's processes, a local cluster, and the in-process engine.

Subcommands:
  prefill | decode   one worker process (gRPC), registered in Redis        -> services.worker_runtime.main_worker
  router             the HTTP gateway                                      -> services.router.server.main_router
  serve              Redis + router + N prefill + M decode on this machine -> services.cluster.LocalCluster
  chat               chat with an in-process engine on stdin (one message a line)
  generate           one completion for one prompt, in process

Every flag also reads an environment variable, Kubernetes style: ``--kv-cache-memory`` reads
``TANDEM_KV_CACHE_MEMORY`` (``--redis-url`` also reads ``REDIS_URL``). The command line wins over the
environment, which wins over the built-in default. A value from the environment is parsed and checked exactly
like the same text on the command line, and only for the subcommand that runs.

Nothing heavy (torch, the engine, the services) is imported until a subcommand runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from common.config import (
    DEFAULT_MODEL,
    CacheConfig,
    CoordConfig,
    EngineConfig,
    ModelConfig,
    RouterConfig,
    SchedulerConfig,
    TransferConfig,
    WorkerConfig,
)

if TYPE_CHECKING:
    from services.cluster import LocalCluster

log = logging.getLogger("tandem.launch")

ENV_PREFIX = "TANDEM_"
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
EXIT_WORDS = frozenset({"exit", "quit", "/exit", "/quit"})
RESET_WORDS = frozenset({"/reset", "/clear"})
EXAMPLE_BODY = '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "stream": true}'


# ---------------------------------------------------------------------------------------------------- values


def parse_bytes(text: str) -> int:
    """'536870912', '512M', '512MiB', '2G', '2GB' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (try 536870912, 512MiB or 2G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_bool(text: str) -> bool:
    """'1/true/yes/on' -> True, '0/false/no/off/empty' -> False (any case); anything else is an error."""
    word = text.strip().lower()
    if word in _TRUE_WORDS or word in _FALSE_WORDS:
        return word in _TRUE_WORDS
    raise argparse.ArgumentTypeError(f"not a yes/no value: {text!r} (try 1 or 0)")


def env_var_name(flag: str) -> str:
    """'--kv-cache-memory' -> 'TANDEM_KV_CACHE_MEMORY'."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


class _EnvText(str):
    """A flag default taken from the environment; remembers its variable so errors can name it."""

    var: str

    def __new__(cls, text: str, var: str) -> _EnvText:
        obj = super().__new__(cls, text)
        obj.var = var
        return obj


class EnvDefaults:
    """Looks flag defaults up in an environment mapping and records every variable name it was asked about.

    Invariant: a found value is returned as text (an ``_EnvText``); argparse converts a text default with the
    option's own ``type`` after parsing, so environment values get the same checks as command-line values.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.names: list[str] = []

    def lookup(self, flag: str, aliases: Sequence[str] = ()) -> _EnvText | None:
        """The first of TANDEM_<FLAG>, *aliases that is set, or None."""
        for var in (env_var_name(flag), *aliases):
            self.names.append(var)
            if var in self.environ:
                return _EnvText(self.environ[var], var)
        return None


def _checked(convert: Callable[[str], Any], choices: Sequence[str] | None) -> Callable[[str], Any]:
    """Wrap a type converter so that environment text is also held to `choices` and errors name the variable."""

    def convert_checked(text: str) -> Any:
        try:
            value = convert(text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(_blame(text, exc, convert)) from None
        if isinstance(text, _EnvText) and choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"{text.var}: invalid choice: {text!r} (choose from {', '.join(choices)})")
        return value

    convert_checked.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return convert_checked


def _blame(text: str, exc: Exception, convert: Callable[[str], Any]) -> str:
    """argparse's own wording, prefixed with the variable's name when the text came from the environment."""
    name = getattr(convert, "__name__", "")
    msg = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"invalid {name} value: {text!r}"
    return f"{text.var}: {msg}" if isinstance(text, _EnvText) else msg


class _Switch(argparse.Action):
    """A flag without a value: True when given, else the environment's yes/no, else False."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = False, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=default, type=_checked(parse_bool, None), help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True)


def add_option(
    group: Any,
    env: EnvDefaults,
    flag: str,
    *,
    default: Any = None,
    type: Callable[[str], Any] = str,
    choices: Sequence[str] | None = None,
    help: str = "",
    env_aliases: Sequence[str] = (),
    **kwargs: Any,
) -> argparse.Action:
    """One ``--flag VALUE`` whose default comes from the environment when set there, else `default`."""
    found = env.lookup(flag, env_aliases)
    names = " or ".join((env_var_name(flag), *env_aliases))
    required = kwargs.pop("required", False) and found is None
    return group.add_argument(
        flag,
        default=default if found is None else found,
        type=_checked(type, choices),
        choices=choices,
        required=required,
        help=f"{help} [env: {names}]".strip(),
        **kwargs,
    )


def add_switch(group: Any, env: EnvDefaults, *flags: str, help: str) -> argparse.Action:
    """One ``--flag`` (no value); its variable (named after the last, long flag) takes 1/0, true/false, yes/no."""
    found = env.lookup(flags[-1])
    default = False if found is None else found
    return group.add_argument(*flags, action=_Switch, default=default, help=f"{help} [env: {env_var_name(flags[-1])}]")


# ---------------------------------------------------------------------------------------------------- flags


def _add_model(group: Any, env: EnvDefaults) -> None:
    add_option(group, env, "--model", default=DEFAULT_MODEL,
               help="name, HF folder, GGUF file or HF id (default: %(default)s)")
    add_option(group, env, "--download-dir", help="model conversion/download cache (default: ~/.cache/tandem)")


def engine_parser(env: EnvDefaults) -> argparse.ArgumentParser:
    """The engine flags every worker (and `chat`, `generate`, `serve`) takes."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    _add_model(g, env)
    add_option(g, env, "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
               help="default: %(default)s")
    add_option(g, env, "--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    add_option(g, env, "--max-model-len", type=int, help="context limit (default: the model's)")
    add_option(g, env, "--kv-cache-memory", type=parse_bytes, metavar="BYTES",
               help="KV cache budget, e.g. 536870912 or 512MiB (default: engine's choice)")
    add_option(g, env, "--gpu-memory-utilization", type=float, default=CacheConfig.gpu_memory_utilization,
               metavar="FRACTION", help="cap on this GPU's memory in use, counting other processes "
               "(default: %(default)s; --kv-cache-memory wins)")
    add_option(g, env, "--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs, help="default: %(default)s")
    add_option(g, env, "--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens,
               help="token budget of one step (default: %(default)s)")
    add_option(g, env, "--block-size", type=int, default=CacheConfig.block_size,
               help="KV block size in tokens (default: %(default)s)")
    add_switch(g, env, "--no-prefix-caching", help="turn the prefix cache off")
    add_switch(g, env, "--enforce-eager", help="no CUDA graphs for decode steps")
    add_option(g, env, "--load-format", default="auto", choices=["auto", "dummy"],
               help="dummy = random weights from the model's config (default: %(default)s)")
    return p


def _coord_parser(env: EnvDefaults, redis_default: str | None = CoordConfig.redis_url) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("coordination")
    add_option(g, env, "--redis-url", default=redis_default, env_aliases=["REDIS_URL"], help="default: %(default)s")
    add_option(g, env, "--namespace", default=CoordConfig.namespace, help="Redis key prefix (default: %(default)s)")
    return p


def _liveness_args(g: Any, env: EnvDefaults) -> None:
    add_option(g, env, "--heartbeat-s", type=float, default=CoordConfig.heartbeat_s, help="default: %(default)s")
    add_option(g, env, "--ttl-s", type=float, default=CoordConfig.ttl_s,
               help="registry key lifetime without a heartbeat (default: %(default)s)")


def _transport_arg(g: Any, env: EnvDefaults) -> None:
    add_option(g, env, "--transport", default=TransferConfig.transport, choices=["auto", "grpc", "nccl"],
               help="KV transport between the pools (default: %(default)s)")


def _listen_args(g: Any, env: EnvDefaults, port: int) -> None:
    add_option(g, env, "--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    add_option(g, env, "--port", type=int, default=port, help="default: %(default)s")


def _verbose_parser(env: EnvDefaults | None) -> argparse.ArgumentParser:
    """-v for a subcommand; with env None the flag is only set when given (the top-level parser holds the default)."""
    p = argparse.ArgumentParser(add_help=False)
    if env is None:
        p.add_argument("-v", "--verbose", action=_Switch, default=argparse.SUPPRESS, help="debug logging")
    else:
        add_switch(p, env, "-v", "--verbose", help="debug logging")
    return p


def _sampling_parser(env: EnvDefaults, max_tokens: int = 256) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    add_option(g, env, "--max-tokens", type=int, default=max_tokens, help="default: %(default)s")
    add_option(g, env, "--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    return p


def _add_worker_command(sub: Any, env: EnvDefaults, role: str, common: list[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(role, parents=[*common, engine_parser(env), _coord_parser(env)],
                         help=f"one {role} worker (gRPC), registered in Redis")
    g = cmd.add_argument_group(role)
    _listen_args(g, env, port=0)
    add_option(g, env, "--advertise-host", help="address other processes dial (default: --host)")
    add_option(g, env, "--worker-id", help="registry id (default: generated)")
    _transport_arg(g, env)
    _liveness_args(g, env)
    add_option(g, env, "--drain-timeout-s", type=float, default=WorkerConfig.drain_timeout_s,
               help="on SIGTERM, how long in-flight work may take (default: %(default)s)")
    add_option(g, env, "--metrics-port", type=int, default=WorkerConfig.metrics_port,
               help="HTTP port on --host for /metrics, /health and /ready (0 = any free port; default: %(default)s)")
    cmd.set_defaults(func=cmd_worker, role=role)


def _add_router_command(sub: Any, env: EnvDefaults, common: list[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("router", parents=[*common, _coord_parser(env)], help="the HTTP gateway")
    g = cmd.add_argument_group("router")
    _add_model(g, env)
    _listen_args(g, env, port=RouterConfig.port)
    _transport_arg(g, env)
    _liveness_args(g, env)
    add_option(g, env, "--local-prefill-max-tokens", type=int, default=RouterConfig.local_prefill_max_tokens,
               help="shorter uncached prompts are prefilled on the decode worker (default: %(default)s)")
    add_option(g, env, "--max-retries", type=int, default=RouterConfig.max_retries, help="default: %(default)s")
    add_option(g, env, "--weight-load", type=float, default=RouterConfig.weight_load, help="default: %(default)s")
    add_option(g, env, "--weight-free-blocks", type=float, default=RouterConfig.weight_free_blocks,
               help="default: %(default)s")
    add_option(g, env, "--weight-prefix-hits", type=float, default=RouterConfig.weight_prefix_hits,
               help="default: %(default)s")
    add_option(g, env, "--served-model-name", help="model id clients send (default: --model)")
    add_option(g, env, "--api-keys", default="", help="comma-separated accepted API keys (default: none = open)")
    add_option(g, env, "--rate-limit-rpm", type=int, help="requests per minute per API key (default: unlimited)")
    add_option(g, env, "--rate-limit-tpm", type=int, help="tokens per minute per API key (default: unlimited)")
    add_option(g, env, "--max-running", type=int, default=RouterConfig.max_running,
               help="requests streamed at once by this router (default: %(default)s)")
    add_option(g, env, "--max-waiting", type=int, default=RouterConfig.max_waiting,
               help="admission queue length; beyond it requests get 429 (default: %(default)s)")
    add_option(g, env, "--processes", type=int, default=RouterConfig.processes,
               help="router processes sharing --port (each a core's worth of streaming; queue limits are per "
                    "process) (default: %(default)s)")
    add_switch(g, env, "--reuse-port", help="bind with SO_REUSEPORT so other processes can share the port")
    cmd.set_defaults(func=cmd_router)


def _add_serve_command(sub: Any, env: EnvDefaults, common: list[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("serve", parents=[*common, engine_parser(env), _coord_parser(env, redis_default=None)],
                         help="Redis + router + N prefill + M decode workers on this machine")
    g = cmd.add_argument_group("cluster")
    add_option(g, env, "--prefill", type=int, default=1, metavar="N", help="prefill workers (default: %(default)s)")
    add_option(g, env, "--decode", type=int, default=1, metavar="M", help="decode workers (default: %(default)s)")
    _listen_args(g, env, port=RouterConfig.port)
    _transport_arg(g, env)
    add_option(g, env, "--ready-timeout-s", type=float, default=120.0,
               help="how long each process may take to come up (default: %(default)s)")
    add_option(g, env, "--log-dir", help="folder for the processes' logs (default: a new temporary folder)")
    cmd.set_defaults(func=cmd_serve)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The whole CLI; flag defaults come from `environ` (default: os.environ)."""
    return _build(EnvDefaults(environ))


def _build(env: EnvDefaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem LLM serving",
                                     parents=[_verbose_parser(env)])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prefill,decode,router,serve,chat,generate}")
    common = [_verbose_parser(None)]
    for role in ("prefill", "decode"):
        _add_worker_command(sub, env, role, common)
    _add_router_command(sub, env, common)
    _add_serve_command(sub, env, common)
    chat = sub.add_parser("chat", parents=[*common, engine_parser(env), _sampling_parser(env)],
                          help="chat with an in-process engine on stdin (one message a line)")
    chat.set_defaults(func=cmd_chat)
    gen = sub.add_parser("generate", parents=[*common, engine_parser(env), _sampling_parser(env)],
                         help="one completion for one prompt, in process")
    add_option(gen, env, "--prompt", required=True)
    add_switch(gen, env, "--chat", help="wrap the prompt as a user chat message")
    gen.set_defaults(func=cmd_generate)
    return parser


def known_env_vars() -> frozenset[str]:
    """Every environment variable some tandem flag reads (LocalCluster keeps these out of its children)."""
    env = EnvDefaults({})
    _build(env)
    return frozenset(env.names)


def engine_argv(args: argparse.Namespace, skip: Iterable[str] = ("--model",)) -> list[str]:
    """The engine flags of parsed `args` written back as explicit command-line words (None values left out)."""
    argv: list[str] = []
    for action in engine_parser(EnvDefaults({}))._actions:
        flag = action.option_strings[-1]
        if flag in skip:
            continue
        value = getattr(args, action.dest, None)
        if isinstance(action, _Switch):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


# ---------------------------------------------------------------------------------------------------- configs


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine part of parsed worker / chat / generate flags."""
    return EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                          load_format=args.load_format, download_dir=args.download_dir,
                          enforce_eager=args.enforce_eager),
        cache=CacheConfig(block_size=args.block_size, enable_prefix_caching=not args.no_prefix_caching,
                          kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
    )


def coord_config(args: argparse.Namespace) -> CoordConfig:
    """Redis coordination from parsed worker / router flags."""
    return CoordConfig(redis_url=args.redis_url, namespace=args.namespace, heartbeat_s=args.heartbeat_s,
                       ttl_s=args.ttl_s)


def transfer_config(args: argparse.Namespace) -> TransferConfig:
    return TransferConfig(transport=args.transport)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The worker's own settings from parsed `prefill` / `decode` flags (role included)."""
    return WorkerConfig(role=args.role, host=args.host, port=args.port, advertise_host=args.advertise_host,
                        worker_id=args.worker_id, drain_timeout_s=args.drain_timeout_s,
                        metrics_port=args.metrics_port)


def router_config(args: argparse.Namespace) -> RouterConfig:
    keys = tuple(key.strip() for key in (getattr(args, "api_keys", "") or "").split(",") if key.strip())
    return RouterConfig(host=args.host, port=args.port, weight_load=args.weight_load,
                        weight_free_blocks=args.weight_free_blocks, weight_prefix_hits=args.weight_prefix_hits,
                        local_prefill_max_tokens=args.local_prefill_max_tokens, max_retries=args.max_retries,
                        served_model_name=getattr(args, "served_model_name", None), api_keys=keys,
                        rate_limit_rpm=getattr(args, "rate_limit_rpm", None),
                        rate_limit_tpm=getattr(args, "rate_limit_tpm", None),
                        max_running=getattr(args, "max_running", RouterConfig.max_running),
                        max_waiting=getattr(args, "max_waiting", RouterConfig.max_waiting),
                        processes=getattr(args, "processes", RouterConfig.processes),
                        reuse_port=getattr(args, "reuse_port", RouterConfig.reuse_port))


# ---------------------------------------------------------------------------------------------------- services


def cmd_worker(args: argparse.Namespace) -> int:
    from services.worker_runtime import main_worker

    return main_worker(args.role, args)


def cmd_router(args: argparse.Namespace) -> int:
    from services.router.server import main_router

    return main_router(args)


class _Shutdown(Exception):
    """SIGINT or SIGTERM asked `tandem serve` to stop."""


def _on_stop_signal(signum: int, _frame: Any) -> None:
    """First SIGINT/SIGTERM: raise _Shutdown in the main thread; later ones only say we are already stopping."""
    signal.signal(signal.SIGINT, _on_repeat_signal)
    signal.signal(signal.SIGTERM, _on_repeat_signal)
    raise _Shutdown(signal.Signals(signum).name)


def _on_repeat_signal(signum: int, _frame: Any) -> None:
    print("tandem: already stopping; waiting for the processes to exit", file=sys.stderr)


def _cluster_from_args(args: argparse.Namespace) -> LocalCluster:
    from pathlib import Path

    from services.cluster import LocalCluster

    verbose = ["-v"] if args.verbose else []
    worker_args = [*engine_argv(args), "--transport", args.transport, *verbose]
    router_args = ["--transport", args.transport, *verbose]
    if args.download_dir:
        router_args += ["--download-dir", args.download_dir]
    return LocalCluster(
        args.model, args.prefill, args.decode, args.port, args.host, worker_args, args.redis_url,
        Path(args.log_dir) if args.log_dir else None,
        namespace=args.namespace, router_args=router_args, ready_timeout_s=args.ready_timeout_s, echo_stderr=True,
    )


def _print_banner(cluster: LocalCluster, stdout: IO[str]) -> None:
    counts = {role: sum(w.role == role for w in cluster.workers.values()) for role in ("prefill", "decode")}
    print(f"tandem: router listening on {cluster.router_url} ({counts['prefill']} prefill, {counts['decode']} decode; "
          f"redis {cluster.redis_url}; logs in {cluster.run_dir})", file=stdout)
    print(f"  curl -N {cluster.router_url}/generate -d '{EXAMPLE_BODY}'", file=stdout)
    print("Ctrl-C stops everything.", file=stdout, flush=True)


def _supervise(cluster: LocalCluster, poll_s: float = 0.5) -> int:
    """Wait for a stop signal; report processes that exit on their own. Returns 1 if the router exits."""
    while True:
        time.sleep(poll_s)
        for proc in cluster.newly_exited():
            print(f"tandem: {proc.worker_id} exited with code {proc.popen.returncode}; log: {proc.log_path}",
                  file=sys.stderr)
            if proc.role == "router":
                return 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the local cluster until SIGINT/SIGTERM; then stop every process (bounded) and return 0."""
    from common.models.loader import resolve_model_path

    # Resolve (convert/download) once here, so the processes do not all convert the same GGUF at once.
    print(f"tandem: model {args.model} -> {resolve_model_path(args.model, args.download_dir)}", file=sys.stderr)
    cluster = _cluster_from_args(args)
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with cluster:
            _print_banner(cluster, sys.stdout)
            return _supervise(cluster)
    except _Shutdown as exc:
        print(f"tandem: {exc}: stopped", file=sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------- in process


def load_engine(args: argparse.Namespace) -> Any:
    """Build the in-process engine from CLI flags; prints the load time to stderr."""
    from common.engine import LLM

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        load_format=args.load_format,
        download_dir=args.download_dir,
    )
    print(f"tandem: loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return llm


def sampling_params(args: argparse.Namespace) -> Any:
    from common.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)


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


def chat_repl(llm: Any, params: Any, stdin: IO[str], stdout: IO[str], interactive: bool) -> None:
    """Answer each line as the next turn of one conversation; `exit` or EOF ends, `/reset` forgets."""
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
        answer = llm.chat(history, params)[0].outputs[0].text
        log.debug("answered in %.2f s", time.perf_counter() - t0)
        history.append({"role": "assistant", "content": answer})
        print(answer, file=stdout, flush=True)


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
    if args.chat:
        outs = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        outs = llm.generate([args.prompt], params)
    print(outs[0].outputs[0].text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

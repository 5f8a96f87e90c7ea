"""`tandem` CLI: argument parsing, environment defaults and the chat loop, with no model or service loaded."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from services import launch
from services.launch import (
    build_parser,
    chat_repl,
    coord_config,
    engine_argv,
    engine_config,
    env_var_name,
    known_env_vars,
    main,
    parse_bool,
    parse_bytes,
    router_config,
    worker_config,
)

SUBCOMMANDS = ["prefill", "decode", "router", "serve", "chat", "generate"]


def parse(argv, environ=None):
    return build_parser({} if environ is None else environ).parse_args(argv)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "[env: TANDEM_" in capsys.readouterr().out


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in SUBCOMMANDS)


def test_a_subcommand_is_required():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_generate_requires_prompt(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser({}).parse_args(["generate"])
    assert exc.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_worker_defaults():
    args = parse(["prefill"])
    assert (args.role, args.model, args.dtype, args.device, args.load_format) == ("prefill", "smollm2", "auto", "auto",
                                                                                  "auto")
    assert (args.host, args.port, args.advertise_host, args.worker_id) == ("127.0.0.1", 0, None, None)
    assert (args.redis_url, args.namespace, args.transport) == ("redis://127.0.0.1:6379/0", "tandem", "auto")
    assert (args.heartbeat_s, args.ttl_s, args.drain_timeout_s) == (1.0, 5.0, 30.0)
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.block_size) == (256, 2048, 16)
    assert args.kv_cache_memory is None and args.no_prefix_caching is False and args.download_dir is None
    assert parse(["decode"]).role == "decode"


def test_worker_flags_build_configs():
    args = parse(["decode", "--model", "m.gguf", "--dtype", "float32", "--device", "cpu", "--max-model-len", "2048",
                  "--kv-cache-memory", "512MiB", "--max-num-seqs", "8", "--block-size", "32", "--no-prefix-caching",
                  "--load-format", "dummy", "--port", "5000", "--worker-id", "d1", "--transport", "grpc",
                  "--redis-url", "redis://h:1/0", "--ttl-s", "2"])
    engine = engine_config(args)
    assert (engine.model.model, engine.model.dtype, engine.model.load_format) == ("m.gguf", "float32", "dummy")
    assert engine.cache.kv_cache_memory == 512 << 20 and engine.cache.enable_prefix_caching is False
    assert (engine.cache.block_size, engine.scheduler.max_num_seqs) == (32, 8)
    assert worker_config(args).role == "decode" and worker_config(args).port == 5000
    assert coord_config(args).redis_url == "redis://h:1/0" and coord_config(args).ttl_s == 2.0


def test_router_defaults_and_config():
    args = parse(["router", "--weight-prefix-hits", "3"])
    assert (args.host, args.port, args.transport, args.max_retries) == ("127.0.0.1", 8000, "auto", 3)
    config = router_config(args)
    assert (config.weight_load, config.weight_free_blocks, config.weight_prefix_hits) == (1.0, 1.0, 3.0)
    assert config.local_prefill_max_tokens == 32


def test_tool_call_flags_reach_the_router_of_serve():
    config = router_config(parse(["router", "--tool-call-parser", "mistral", "--enable-auto-tool-choice"]))
    assert (config.tool_call_parser, config.enable_auto_tool_choice) == ("mistral", True)
    assert router_config(parse(["router"])).tool_call_parser is None
    with pytest.raises(SystemExit):
        parse(["router", "--tool-call-parser", "xml"])
    args = parse(["serve", "--tool-call-parser", "hermes"], {"TANDEM_ENABLE_AUTO_TOOL_CHOICE": "1"})
    router_args = launch._cluster_from_args(args).router_args
    assert router_args[-3:] == ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"]


SERVE_ROUTER_FLAGS = ["--api-keys", "k1,k2", "--rate-limit-rpm", "60", "--rate-limit-tpm", "9000",
                      "--served-model-name", "tiny", "--max-running", "7", "--max-waiting", "3", "--processes", "2",
                      "--weight-prefix-hits", "3.5", "--slo-tpot-ms", "40"]


def test_serve_takes_every_router_flag():
    """Each router setting is declared once (RouterConfig); `serve` must offer every one the router has."""
    from common.config import RouterConfig
    from common.settings import setting_fields

    serve_help = build_parser({})._subparsers._group_actions[0].choices["serve"].format_help()
    missing = [f.flag for f in setting_fields(RouterConfig) if f.info.cli and f.flag not in serve_help]
    assert not missing, missing


def _router_config_of_serve(args):
    """The RouterConfig the router child of `serve` would build: its command line and environment, parsed."""
    cluster = launch._cluster_from_args(args)
    return router_config(parse(["router", *cluster.router_args], cluster.router_env)), cluster


def test_serve_passes_its_router_flags_to_the_router():
    args = parse(["serve", *SERVE_ROUTER_FLAGS])
    config, cluster = _router_config_of_serve(args)
    assert config == router_config(parse(["router", *SERVE_ROUTER_FLAGS]))
    assert config.api_keys == ("k1", "k2") and config.processes == 2 and config.served_model_name == "tiny"
    assert "k1,k2" not in " ".join(cluster.router_args)  # ps shows command lines to every user
    assert cluster.router_env == {"TANDEM_API_KEYS": "k1,k2"}


def test_serve_passes_router_env_vars_to_the_router():
    """LocalCluster strips TANDEM_* from its children: `serve` must read them and pass them on itself."""
    environ = {"TANDEM_API_KEYS": "secret", "TANDEM_RATE_LIMIT_RPM": "5", "TANDEM_SERVED_MODEL_NAME": "m"}
    config, _ = _router_config_of_serve(parse(["serve"], environ))
    assert (config.api_keys, config.rate_limit_rpm, config.served_model_name) == (("secret",), 5, "m")
    default, cluster = _router_config_of_serve(parse(["serve"]))
    assert default == router_config(parse(["router"])) and cluster.router_env == {}


def test_serve_defaults():
    args = parse(["serve"])
    assert (args.prefill, args.decode, args.port, args.host) == (1, 1, 8000, "127.0.0.1")
    assert args.redis_url is None  # no REDIS_URL: serve starts its own redis-server


def test_env_fallback_and_flag_precedence():
    environ = {"TANDEM_PORT": "9001", "TANDEM_MODEL": "qwen", "TANDEM_KV_CACHE_MEMORY": "2G"}
    assert parse(["serve"], environ).port == 9001
    assert parse(["router"], environ).port == 9001
    assert parse(["serve", "--port", "7"], environ).port == 7
    args = parse(["prefill"], environ)
    assert (args.model, args.kv_cache_memory) == ("qwen", 2 << 30)


def test_redis_url_env_names():
    assert parse(["router"], {"REDIS_URL": "redis://a:1/0"}).redis_url == "redis://a:1/0"
    assert parse(["serve"], {"REDIS_URL": "redis://a:1/0"}).redis_url == "redis://a:1/0"
    both = {"REDIS_URL": "redis://a:1/0", "TANDEM_REDIS_URL": "redis://b:2/0"}
    assert parse(["decode"], both).redis_url == "redis://b:2/0"


def test_env_switches_and_verbose():
    assert parse(["decode"], {"TANDEM_NO_PREFIX_CACHING": "true"}).no_prefix_caching is True
    assert parse(["decode"], {"TANDEM_NO_PREFIX_CACHING": "0"}).no_prefix_caching is False
    assert parse(["decode"], {"TANDEM_VERBOSE": "1"}).verbose is True
    assert parse(["-v", "decode"]).verbose is True
    assert parse(["decode", "-v"]).verbose is True
    assert parse(["decode"]).verbose is False


def test_env_prompt_satisfies_required_flag():
    assert parse(["generate"], {"TANDEM_PROMPT": "hi"}).prompt == "hi"


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"TANDEM_PORT": "abc"}, ["TANDEM_PORT", "abc"]),
        ({"TANDEM_DTYPE": "fp8"}, ["TANDEM_DTYPE", "invalid choice"]),
        ({"TANDEM_KV_CACHE_MEMORY": "lots"}, ["TANDEM_KV_CACHE_MEMORY", "byte size"]),
        ({"TANDEM_NO_PREFIX_CACHING": "maybe"}, ["TANDEM_NO_PREFIX_CACHING", "yes/no"]),
    ],
)
def test_bad_env_value_is_a_usage_error_naming_the_variable(environ, words, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["decode"], environ)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


def test_bad_env_value_only_matters_to_subcommands_that_read_it():
    assert parse(["router"], {"TANDEM_DTYPE": "fp8"}).command == "router"


def test_env_var_names():
    assert env_var_name("--kv-cache-memory") == "TANDEM_KV_CACHE_MEMORY"
    names = known_env_vars()
    assert {"TANDEM_PORT", "TANDEM_MODEL", "TANDEM_WORKER_ID", "REDIS_URL", "TANDEM_NO_PREFIX_CACHING"} <= names


def test_engine_argv_round_trips_through_the_worker_parser():
    args = parse(["serve", "--kv-cache-memory", "1G", "--no-prefix-caching", "--device", "cpu", "--load-format",
                  "dummy", "--max-model-len", "512"])
    argv = engine_argv(args)
    assert "--model" not in argv
    again = parse(["prefill", *argv])
    for dest in ("kv_cache_memory", "no_prefix_caching", "device", "load_format", "max_model_len", "dtype",
                 "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "block_size", "download_dir"):
        assert getattr(again, dest) == getattr(args, dest), dest


NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'


def test_speculative_config_flag_is_in_worker_help_and_reaches_the_engine_config(capsys):
    with pytest.raises(SystemExit):
        parse(["decode", "--help"])
    assert "--speculative-config JSON" in capsys.readouterr().out
    spec = engine_config(parse(["decode", "--speculative-config", NGRAM])).scheduler.speculative_config
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == (
        "ngram", 3, 2, 4)
    assert engine_config(parse(["decode"])).scheduler.speculative_config is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{bad", ["--speculative-config", "not JSON"]),
        ('{"method": "ngram", "num_speculative_tokens": 3, "lookahead": 1}', ["speculative_config.lookahead"]),
        ('{"method": "eagle", "num_speculative_tokens": 3}', ["model", "needs the path"]),
        ("[1, 2]", ["expected a JSON object"]),
    ],
)
def test_bad_speculative_config_is_a_usage_error_naming_the_problem(text, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["decode", "--speculative-config", text])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err and all(word in err for word in words), err


def test_bad_speculative_config_env_value_is_a_usage_error_naming_the_variable(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["decode"], {"TANDEM_SPECULATIVE_CONFIG": "{bad"})
    assert exc.value.code == 2
    assert "TANDEM_SPECULATIVE_CONFIG" in capsys.readouterr().err


def test_serve_passes_the_speculative_config_to_its_workers_as_json():
    args = parse(["serve", "--speculative-config", NGRAM])
    again = parse(["decode", *engine_argv(args)])
    assert again.speculative_config == args.speculative_config


def test_chat_and_generate_flags():
    args = parse(["generate", "--prompt", "hi", "--max-tokens", "8", "--temperature", "0.7", "--chat"])
    assert (args.prompt, args.max_tokens, args.temperature, args.chat) == ("hi", 8, 0.7, True)
    args = parse(["generate", "--prompt", "hi", "--seed", "7", "--top-p", "0.9", "--stop", ".", "--stop", "\n",
                  "--stream"])
    params = launch.sampling_params(args)
    assert (params.seed, params.top_p, params.stop, args.stream) == (7, 0.9, (".", "\n"), True)
    args = parse(["chat", "--device", "cpu", "--kv-cache-memory", "512MiB"])
    assert (args.device, args.kv_cache_memory, args.max_tokens) == ("cpu", 512 << 20, 256)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024", 1024), ("512M", 512 << 20), ("512MiB", 512 << 20), ("2g", 2 << 30), ("3 KB", 3 << 10)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("Yes", True), ("on", True), ("0", False), ("", False)])
def test_parse_bool(text, expected):
    assert parse_bool(text) is expected


def test_bad_byte_size_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--kv-cache-memory", "lots"])
    assert exc.value.code == 2


class _EchoLLM:
    """Stands in for the engine: streams an answer naming the number of messages it was given, in two pieces."""

    def __init__(self):
        self.calls = []

    def stream(self, llm, messages, params):
        self.calls.append(list(messages))
        yield "answer "
        yield str(len(messages))


def test_chat_repl_keeps_history_and_stops_at_exit():
    llm, out = _EchoLLM(), io.StringIO()
    stdin = io.StringIO("What is the capital of France?\n\nAnd of Italy?\n/reset\nHi\nexit\nnever read\n")
    chat_repl(llm, params=None, stdin=stdin, stdout=out, interactive=False, stream=llm.stream)
    assert out.getvalue().splitlines() == ["answer 1", "answer 3", "answer 1"]
    assert llm.calls[1][1] == {"role": "assistant", "content": "answer 1"}


def test_help_imports_no_heavy_module():
    code = (
        "import sys\nfrom services.launch import main\n"
        "for cmd in ['serve', 'prefill', 'router', 'chat']:\n"
        "    try:\n        main([cmd, '--help'])\n    except SystemExit:\n        pass\n"
        "heavy = {'torch', 'redis', 'grpc', 'fastapi', 'services.cluster', 'common.engine'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

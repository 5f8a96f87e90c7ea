"""The `tandem` command line, derived from the settings table in ``common.config``.

Every flag also reads an environment variable, Kubernetes style: ``--kv-cache-memory`` reads
``TANDEM_KV_CACHE_MEMORY`` (``--redis-url`` also reads ``REDIS_URL``). The command line wins over the
environment, which wins over the declared default. A value from the environment is parsed and checked exactly
like the same text on the command line, and only for the subcommand that runs.

This module and ``common.config`` import nothing heavy, so ``tandem --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from common.config import (
    ENGINE_PARTS,
    CoordConfig,
    EngineConfig,
    ModelConfig,
    PlannerConfig,
    ProfileConfig,
    RouterConfig,
    ServeConfig,
    TransferConfig,
    WorkerConfig,
    WorkerSettings,
)
from common.settings import SettingField, SettingValueError, env_var_name, parse_bool, setting_fields
from common.version import tandem_version

SUBCOMMANDS = ("prefill", "decode", "router", "serve", "planner", "profile", "chat", "generate")
WORKER_ROLES = ("prefill", "decode")
_ROUTER_MODEL_FIELDS = ("model", "download_dir")


# ---------------------------------------------------------------------------------------------------- env values


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
    own_words = isinstance(exc, argparse.ArgumentTypeError | SettingValueError)
    msg = str(exc) if own_words else f"invalid {name} value: {text!r}"
    return f"{text.var}: {msg}" if isinstance(text, _EnvText) else msg


class _Switch(argparse.Action):
    """A flag without a value: True when given, else the environment's yes/no, else False."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = False, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=default, type=_checked(parse_bool, None), help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True)


def add_option(group: Any, env: EnvDefaults, flag: str, *, default: Any = None, type: Callable[[str], Any] = str,
               choices: Sequence[str] | None = None, help: str = "", env_aliases: Sequence[str] = (),
               **kwargs: Any) -> argparse.Action:
    """One ``--flag VALUE`` whose default comes from the environment when set there, else `default`."""
    found = env.lookup(flag, env_aliases)
    names = " or ".join((env_var_name(flag), *env_aliases))
    required = kwargs.pop("required", False) and found is None
    return group.add_argument(flag, default=default if found is None else found, type=_checked(type, choices),
                              choices=choices, required=required, help=f"{help} [env: {names}]".strip(), **kwargs)


def add_switch(group: Any, env: EnvDefaults, *flags: str, help: str) -> argparse.Action:
    """One ``--flag`` (no value); its variable (named after the last, long flag) takes 1/0, true/false, yes/no."""
    found = env.lookup(flags[-1])
    default = False if found is None else found
    return group.add_argument(*flags, action=_Switch, default=default, help=f"{help} [env: {env_var_name(flags[-1])}]")


# ---------------------------------------------------------------------------------------------------- settings


def _flag_dest(field: SettingField) -> str:
    return field.flag.lstrip("-").replace("-", "_")


def add_setting(group: Any, env: EnvDefaults, field: SettingField, default: Any) -> None:
    """The flag of one declared setting (a switch for a bool) with `default` when the environment sets none."""
    info = field.info
    if field.is_switch:
        add_switch(group, env, field.flag, help=info.help)
        return
    extra = {"metavar": info.metavar} if info.metavar else {}
    add_option(group, env, field.flag, default=default, type=field.parse, choices=info.choices, help=info.help,
               env_aliases=info.env_aliases, **extra)


def add_settings(group: Any, env: EnvDefaults, config_cls: type, only: Iterable[str] | None = None,
                 defaults: Mapping[str, Any] | None = None) -> None:
    """Flags for the command-line settings of `config_cls` (all, or those named in `only`)."""
    wanted = None if only is None else set(only)
    defaults = defaults or {}
    for field in setting_fields(config_cls):
        if field.info.cli and (wanted is None or field.name in wanted):
            add_setting(group, env, field, defaults.get(field.name, field.default))


def config_from_args(config_cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """`config_cls` from the parsed flags it declares (settings without a flag here keep their defaults)."""
    values = {f.name: f.value_from_flag(getattr(args, _flag_dest(f))) for f in setting_fields(config_cls)
              if f.info.cli and hasattr(args, _flag_dest(f))}
    return config_cls(**values, **fixed)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine part of parsed worker / serve / chat / generate flags."""
    return EngineConfig(**{part: config_from_args(cls, args) for part, cls in ENGINE_PARTS.items()})


def coord_config(args: argparse.Namespace) -> CoordConfig:
    """Redis coordination from parsed worker / router flags."""
    return config_from_args(CoordConfig, args)


def transfer_config(args: argparse.Namespace) -> TransferConfig:
    return config_from_args(TransferConfig, args)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The worker's own settings from parsed `prefill` / `decode` flags (role included)."""
    return config_from_args(WorkerConfig, args, role=args.role)


def worker_settings(args: argparse.Namespace) -> WorkerSettings:
    return WorkerSettings(engine_config(args), worker_config(args), coord_config(args), transfer_config(args))


def router_config(args: argparse.Namespace) -> RouterConfig:
    return config_from_args(RouterConfig, args)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    return config_from_args(ServeConfig, args)


def planner_config(args: argparse.Namespace) -> PlannerConfig:
    return config_from_args(PlannerConfig, args)


def profile_config(args: argparse.Namespace) -> ProfileConfig:
    return config_from_args(ProfileConfig, args)


# ---------------------------------------------------------------------------------------------------- parsers


def engine_parser(env: EnvDefaults) -> argparse.ArgumentParser:
    """The engine flags every worker (and `chat`, `generate`, `serve`) takes."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    for config_cls in ENGINE_PARTS.values():
        add_settings(g, env, config_cls)
    return p


def _coord_parser(env: EnvDefaults, *, own_redis: bool = False) -> argparse.ArgumentParser:
    """Redis flags; with `own_redis` (`serve`) no URL by default (it starts its own redis-server) and no liveness."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("coordination")
    names = ("redis_url", "namespace") if own_redis else ("redis_url", "namespace", "heartbeat_s", "ttl_s")
    add_settings(g, env, CoordConfig, names, defaults={"redis_url": None} if own_redis else None)
    return p


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
    add_option(g, env, "--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    add_option(g, env, "--seed", type=int, default=None, help="sampling seed, for repeatable output (default: none)")
    add_option(g, env, "--stop", action="append", help="stop before this text; repeat for several (default: none)")
    return p


def _add_worker_command(sub: Any, env: EnvDefaults, role: str, common: list[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(role, parents=[*common, engine_parser(env), _coord_parser(env)],
                         help=f"one {role} worker (gRPC), registered in Redis")
    g = cmd.add_argument_group(role)
    add_settings(g, env, WorkerConfig)
    add_settings(g, env, TransferConfig)
    cmd.set_defaults(role=role)


def _add_router_command(sub: Any, env: EnvDefaults, common: list[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("router", parents=[*common, _coord_parser(env)], help="the HTTP gateway")
    g = cmd.add_argument_group("router")
    add_settings(g, env, ModelConfig, _ROUTER_MODEL_FIELDS)
    add_settings(g, env, TransferConfig)
    add_settings(g, env, RouterConfig)


def _add_serve_command(sub: Any, env: EnvDefaults, common: list[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("serve", parents=[*common, engine_parser(env),
                                           _coord_parser(env, own_redis=True)],
                         help="Redis + router + N prefill + M decode workers on this machine")
    add_settings(cmd.add_argument_group("cluster"), env, ServeConfig)
    add_settings(cmd.add_argument_group("router"), env, RouterConfig)  # every one: passed on by router_argv
    add_settings(cmd.add_argument_group("transfer"), env, TransferConfig)


def _add_planner_command(sub: Any, env: EnvDefaults, common: list[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("planner", parents=common,
                         help="scale the prefill and decode Deployments to meet the TTFT / TPOT SLO")
    add_settings(cmd.add_argument_group("planner"), env, PlannerConfig)


def _add_profile_command(sub: Any, env: EnvDefaults, common: list[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("profile", parents=[*common, engine_parser(env)],
                         help="measure this machine's prefill rate and decode TPOT; write the planner's profile")
    add_settings(cmd.add_argument_group("profile"), env, ProfileConfig)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The whole CLI; flag defaults come from `environ` (default: os.environ). `args.command` names the subcommand."""
    return _build(EnvDefaults(environ))


def _build(env: EnvDefaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem LLM serving", parents=[_verbose_parser(env)])
    parser.add_argument("--version", action="version", version=f"tandem {tandem_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    common = [_verbose_parser(None)]
    for role in WORKER_ROLES:
        _add_worker_command(sub, env, role, common)
    _add_router_command(sub, env, common)
    _add_serve_command(sub, env, common)
    _add_planner_command(sub, env, common)
    _add_profile_command(sub, env, common)
    sub.add_parser("chat", parents=[*common, engine_parser(env), _sampling_parser(env)],
                   help="chat with an in-process engine on stdin (one message a line)")
    gen = sub.add_parser("generate", parents=[*common, engine_parser(env), _sampling_parser(env)],
                         help="one completion for one prompt, in process")
    add_option(gen, env, "--prompt", required=True)
    add_switch(gen, env, "--chat", help="wrap the prompt as a user chat message")
    add_switch(gen, env, "--stream", help="print the text as it is generated")
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
            argv += [flag, _flag_word(value)]
    return argv


def settings_argv(config_cls: type, args: argparse.Namespace, skip: Iterable[str] = ()
                  ) -> tuple[list[str], dict[str, str]]:
    """`config_cls`'s settings in parsed `args` that differ from their declared default, written back for a child
    process: (command-line words, environment). Secret settings go into the environment (TANDEM_<FLAG>), the rest
    onto the command line; names in `skip` are left out (the caller passes those itself)."""
    argv: list[str] = []
    environ: dict[str, str] = {}
    for field in setting_fields(config_cls):
        dest = _flag_dest(field)
        if not field.info.cli or field.name in skip or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is None or field.value_from_flag(value) == field.default:
            continue
        if field.info.secret:
            environ[field.env_var] = _flag_word(value)
        else:
            argv += [field.flag] if field.is_switch else [field.flag, _flag_word(value)]
    return argv, environ


def _flag_word(value: Any) -> str:
    """A parsed setting written as the word its flag parses back (a pydantic model, e.g. --speculative-config, as
    JSON; its repr would not parse; a tuple, e.g. --api-keys, comma-separated)."""
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    to_json = getattr(value, "model_dump_json", None)
    return to_json(exclude_none=True) if to_json is not None else str(value)

"""The settings table: each setting is declared once, as a field of a config dataclass in ``common.config``.

``setting(default, help=...)`` is ``dataclasses.field`` plus what the command line needs (flag, parser,
choices, extra environment names). From that one declaration come: the ``tandem`` flags and their
``TANDEM_*`` environment variables (``services.flags``), the keyword arguments of ``LLM(...)``
(``EngineConfig.from_kwargs``) and the chart's flags (tests/helm checks every chart flag against the parser).

Why not pydantic-settings: its CLI source would be a second parser beside argparse with other help and error
texts, and it reads every variable of a model at once, while ``tandem`` must check an environment value only
for the subcommand that reads it and name the variable in the usage error; the frozen dataclasses stay plain
(the engine builds them in hot-free code paths and compares them by value). This module is stdlib only, so
``tandem --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "TANDEM_"
_METADATA_KEY = "tandem.setting"
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
# Plain annotations whose text parser is the type itself; anything else names its parser explicitly.
_PARSERS_BY_ANNOTATION: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


class SettingValueError(ValueError):
    """Text that does not parse as the setting's type (argparse reports it as a usage error)."""


def parse_bytes(text: str) -> int:
    """'536870912', '512M', '512MiB', '2G', '2GB' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise SettingValueError(f"not a byte size: {text!r} (try 536870912, 512MiB or 2G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_bool(text: str) -> bool:
    """'1/true/yes/on' -> True, '0/false/no/off/empty' -> False (any case); anything else is an error."""
    word = text.strip().lower()
    if word in _TRUE_WORDS or word in _FALSE_WORDS:
        return word in _TRUE_WORDS
    raise SettingValueError(f"not a yes/no value: {text!r} (try 1 or 0)")


def parse_csv(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def env_var_name(flag: str) -> str:
    """'--kv-cache-memory' -> 'TANDEM_KV_CACHE_MEMORY'."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


@dataclass(frozen=True)
class Setting:
    """How one config field appears outside Python.

    ``flag`` defaults to ``--field-name``. A bool field is a switch (a flag without a value); ``negated`` means
    the switch turns the field off (``--no-prefix-caching`` sets ``enable_prefix_caching=False``). ``cli=False``
    keeps a field off the command line (``LLM(...)`` and tests still set it). ``secret`` values (API keys) reach a
    child process through its environment, never its command line, which ``ps`` shows every local user.
    """

    help: str
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    env_aliases: tuple[str, ...] = ()
    metavar: str | None = None
    negated: bool = False
    cli: bool = True
    secret: bool = False


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
            **options: Any) -> Any:
    """A dataclass field that is also a documented setting (see ``Setting`` for ``options``)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_METADATA_KEY: Setting(help=help, **options)})


@dataclass(frozen=True)
class SettingField:
    """One declared setting of a config class, resolved for the command line."""

    name: str
    flag: str
    default: Any
    is_switch: bool
    parse: Callable[[str], Any]
    info: Setting

    @property
    def env_var(self) -> str:
        return env_var_name(self.flag)

    def value_from_flag(self, value: Any) -> Any:
        """The field's value from what argparse holds for its flag (a negated switch flips)."""
        return (not value) if self.info.negated else value


def setting_fields(config_cls: type) -> Iterator[SettingField]:
    """Every field of ``config_cls`` declared with ``setting``, in declaration order."""
    for f in dataclasses.fields(config_cls):
        info = f.metadata.get(_METADATA_KEY)
        if info is None:
            continue
        yield SettingField(f.name, info.flag or "--" + f.name.replace("_", "-"), _default_of(f),
                           _is_switch(f), _parser_of(f, info), info)


def setting_field(config_cls: type, name: str) -> SettingField:
    for field in setting_fields(config_cls):
        if field.name == name:
            return field
    raise KeyError(f"{config_cls.__name__} declares no setting {name!r}")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _annotation(f: dataclasses.Field) -> str:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return text.replace(" | None", "").strip()


def _is_switch(f: dataclasses.Field) -> bool:
    return _annotation(f) == "bool"


def _parser_of(f: dataclasses.Field, info: Setting) -> Callable[[str], Any]:
    if info.parse is not None:
        return info.parse
    if _is_switch(f):
        return parse_bool
    try:
        return _PARSERS_BY_ANNOTATION[_annotation(f)]
    except KeyError:
        raise TypeError(f"setting {f.name!r} of type {f.type!r} needs parse=") from None

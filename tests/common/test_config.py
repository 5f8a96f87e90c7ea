"""The settings table: one declaration per setting, from which flags, env vars and LLM(...) arguments derive."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import (
    ENGINE_PARTS,
    CacheConfig,
    CoordConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    PlannerConfig,
    ProfileConfig,
    RouterConfig,
    SchedulerConfig,
    ServeConfig,
    TransferConfig,
    WorkerConfig,
)
from common.settings import SettingValueError, parse_csv, setting_field, setting_fields
from services.flags import build_parser, engine_config, router_config

CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig, LoRAConfig, CoordConfig, TransferConfig, WorkerConfig,
           RouterConfig, ServeConfig, PlannerConfig, ProfileConfig)
# Flags that are per-invocation inputs or CLI behaviour, not settings of a component.
# The sampling flags of `generate` / `chat` are request fields (SamplingParams is their source).
NOT_SETTINGS = {"--help", "--verbose", "--max-tokens", "--temperature", "--top-p", "--seed", "--stop", "--prompt",
                "--chat", "--stream"}


@pytest.mark.parametrize("config_cls", CONFIGS)
def test_every_field_is_a_documented_setting(config_cls):
    declared = {f.name for f in setting_fields(config_cls)}
    assert declared == {f.name for f in dataclasses.fields(config_cls)}
    assert all(f.info.help for f in setting_fields(config_cls))


def test_every_flag_comes_from_the_table():
    table = {f.flag for cls in CONFIGS for f in setting_fields(cls) if f.info.cli}
    parser = build_parser({})
    flags = set()
    for sub in parser._subparsers._group_actions[0].choices.values():
        flags |= {action.option_strings[-1] for action in sub._actions if action.option_strings}
    assert flags - NOT_SETTINGS == table


def test_defaults_of_flags_are_the_declared_ones():
    args = build_parser({}).parse_args(["decode"])
    assert engine_config(args) == EngineConfig()
    assert router_config(build_parser({}).parse_args(["router"])) == RouterConfig()


def test_llm_keywords_cover_every_engine_setting():
    config = EngineConfig.from_kwargs(model="m", max_num_seqs=3, kv_cache_memory=1 << 20, enforce_eager=True,
                                      enable_chunked_prefill=False)
    assert (config.model.model, config.scheduler.max_num_seqs, config.cache.kv_cache_memory) == ("m", 3, 1 << 20)
    lora = EngineConfig.from_kwargs(enable_lora=True, lora_modules={"sql": "/a/sql"}, max_loras=2).lora
    assert (lora.enable_lora, lora.adapter_paths, lora.max_loras, lora.max_cpu_loras) == (True, {"sql": "/a/sql"}, 2, 2)
    args = build_parser({}).parse_args(["decode", "--enable-lora", "--lora-modules", "a=/p/a,b=/p/b"])
    assert engine_config(args).lora.lora_modules == (("a", "/p/a"), ("b", "/p/b"))
    assert config.model.enforce_eager and not config.scheduler.enable_chunked_prefill
    assert EngineConfig.from_kwargs(**config.to_kwargs()) == config
    names = {f.name for cls in ENGINE_PARTS.values() for f in dataclasses.fields(cls)}
    assert set(config.to_kwargs()) == names


def test_unknown_llm_keyword_names_the_settings():
    with pytest.raises(TypeError, match="unknown engine setting 'max_seqs'.*max_num_seqs"):
        EngineConfig.from_kwargs(max_seqs=3)


def test_negated_switch_and_parsers():
    field = setting_field(CacheConfig, "enable_prefix_caching")
    assert (field.flag, field.is_switch, field.value_from_flag(True)) == ("--no-prefix-caching", True, False)
    assert setting_field(CacheConfig, "kv_cache_memory").parse("2G") == 2 << 30
    with pytest.raises(SettingValueError, match="byte size"):
        setting_field(CacheConfig, "kv_cache_memory").parse("lots")
    assert parse_csv(" a, b,,c ") == ("a", "b", "c")
    args = build_parser({"TANDEM_API_KEYS": "k1,k2"}).parse_args(["router"])
    assert router_config(args).api_keys == ("k1", "k2")


def test_lora_config_defaults_and_parsing():
    """vLLM's defaults (max_loras 1, max_lora_rank 16, max_cpu_loras = max_loras); NAME=PATH lists in every form."""
    assert {f.name for f in setting_fields(LoRAConfig)} == {f.name for f in dataclasses.fields(LoRAConfig)}
    config = LoRAConfig()
    assert (config.enable_lora, config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (False, 1, 16, 1)
    parse = setting_field(LoRAConfig, "lora_modules").parse
    expected = (("sql", "/a/sql"), ("chat", "/a/chat"))
    assert parse("sql=/a/sql chat=/a/chat") == parse("sql=/a/sql, chat=/a/chat") == expected
    assert LoRAConfig(lora_modules={"sql": "/a/sql", "chat": "/a/chat"}).lora_modules == expected
    assert LoRAConfig(lora_modules=["sql=/a/sql", ("chat", "/a/chat")], max_loras=3).max_cpu_loras == 3
    assert LoRAConfig(lora_modules="sql=/a/sql").adapter_paths == {"sql": "/a/sql"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lora_modules="sql=/a sql=/b"), "unique"),
        (dict(lora_modules="sql"), "NAME=PATH"),
        (dict(lora_modules="=/a"), "NAME=PATH"),
        (dict(max_loras=0), "max_loras must be positive"),
        (dict(max_lora_rank=-8), "max_lora_rank must be positive"),
        (dict(max_loras=4, max_cpu_loras=2), r"max_cpu_loras \(2\) must be >= max_loras \(4\)"),
    ],
)
def test_lora_config_refusals(kwargs, message):
    with pytest.raises(SettingValueError, match=message):
        LoRAConfig(**kwargs)


def test_lora_names_must_not_be_the_base_model_name():
    config = LoRAConfig(lora_modules="smollm2=/a")
    config.check_names_against("other")
    with pytest.raises(SettingValueError, match="'smollm2' is the base model's name"):
        config.check_names_against("smollm2")

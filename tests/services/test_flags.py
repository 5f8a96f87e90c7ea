"""vLLM-compatible flags of the `tandem` command line: `--version` and `--chat-template`."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from services import launch
from services.flags import build_parser, router_config


def parse(argv, environ=None):
    return build_parser({} if environ is None else environ).parse_args(argv)


def test_version_prints_the_installed_version_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tandem {importlib.metadata.version('tandem')}"


def test_version_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "services.launch", "--version"], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == f"tandem {importlib.metadata.version('tandem')}"


def test_chat_template_reaches_the_router_and_the_router_of_serve():
    assert router_config(parse(["router", "--chat-template", "llama3.jinja"])).chat_template == "llama3.jinja"
    assert router_config(parse(["router"], {"TANDEM_CHAT_TEMPLATE": "t.jinja"})).chat_template == "t.jinja"
    assert router_config(parse(["router"])).chat_template is None
    router_args = launch._cluster_from_args(parse(["serve", "--chat-template", "llama3.jinja"])).router_args
    assert router_args[-2:] == ["--chat-template", "llama3.jinja"]

"""`tandem` CLI: argument parsing and the chat loop, with no model loaded."""

from __future__ import annotations

import io
import subprocess
import sys
from types import SimpleNamespace

import pytest

from services.launch import build_parser, chat_repl, main, parse_bytes


def test_serve_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    assert "--kv-cache-memory" in capsys.readouterr().out


def test_generate_requires_prompt(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate"])
    assert exc.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_a_subcommand_is_required():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_serve_defaults_and_flags():
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.dtype, args.device) == ("smollm2", "auto", "auto")
    assert args.max_model_len is None and args.kv_cache_memory is None
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "m.gguf",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--max-model-len",
            "2048",
            "--kv-cache-memory",
            "512MiB",
        ]
    )
    assert (args.model, args.dtype, args.device, args.max_model_len) == ("m.gguf", "float32", "cpu", 2048)
    assert args.kv_cache_memory == 512 << 20


def test_generate_flags():
    args = build_parser().parse_args(
        ["generate", "--prompt", "hi", "--max-tokens", "8", "--temperature", "0.7", "--chat"]
    )
    assert (args.prompt, args.max_tokens, args.temperature, args.chat) == ("hi", 8, 0.7, True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024", 1024), ("512M", 512 << 20), ("512MiB", 512 << 20), ("2g", 2 << 30), ("3 KB", 3 << 10)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_bad_byte_size_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--kv-cache-memory", "lots"])
    assert exc.value.code == 2


class _EchoLLM:
    """Stands in for common.engine.LLM: answers with the number of messages it was given."""

    def __init__(self):
        self.calls = []

    def chat(self, messages, params):
        self.calls.append(list(messages))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f"answer {len(messages)}")])]


def test_chat_repl_keeps_history_and_stops_at_exit():
    llm, out = _EchoLLM(), io.StringIO()
    stdin = io.StringIO("What is the capital of France?\n\nAnd of Italy?\n/reset\nHi\nexit\nnever read\n")
    chat_repl(llm, params=None, stdin=stdin, stdout=out, interactive=False)
    assert out.getvalue().splitlines() == ["answer 1", "answer 3", "answer 1"]
    assert llm.calls[1][1] == {"role": "assistant", "content": "answer 1"}


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom services.launch import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'launch imports torch at parse time'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

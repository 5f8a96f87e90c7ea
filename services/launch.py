"""`tandem` command line: `serve` (chat on stdin for now) and `generate` (one shot).

The disaggregated cluster (Redis + router + prefill + decode) arrives later; until then `serve`
loads one in-process engine and answers chat messages read from stdin.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from common.config import DEFAULT_MODEL

log = logging.getLogger("tandem.launch")

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
EXIT_WORDS = frozenset({"exit", "quit", "/exit", "/quit"})
RESET_WORDS = frozenset({"/reset", "/clear"})


def parse_bytes(text: str) -> int:
    """'536870912', '512M', '512MiB', '2G', '2GB' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (try 536870912, 512MiB or 2G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def _engine_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL, help="name, HF folder, GGUF file or HF id (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=None,
        metavar="BYTES",
        help="KV cache budget, e.g. 536870912 or 512MiB (default: engine's choice)",
    )
    return p


def _sampling_args(max_tokens: int = 256) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="default: %(default)s")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem LLM serving")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,generate}")
    parents = [_engine_args(), _sampling_args()]
    serve = sub.add_parser("serve", parents=parents, help="chat with the model on stdin (one message a line)")
    serve.set_defaults(func=cmd_serve)
    gen = sub.add_parser("generate", parents=parents, help="one completion for one prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user chat message")
    gen.set_defaults(func=cmd_generate)
    return parser


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
    )
    print(f"tandem: loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return llm


def sampling_params(args: argparse.Namespace) -> Any:
    from common.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)


def _read_messages(stdin: IO[str], interactive: bool):
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


def cmd_serve(args: argparse.Namespace) -> int:
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

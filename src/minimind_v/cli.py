"""`minimind-v <command>`: one entry point, each command a typed function in its own module.

A command module exposes an `Options` dataclass (its flags) and a function taking it. The
module is imported only when its command runs, so `minimind-v --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from minimind_v.errors import UserError
from minimind_v.options import add_dataclass_args, dataclass_from_args

# name -> (module, options class, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "synth": ("minimind_v.data.synth", "SynthOptions", "main", "write the synthetic image-text world"),
    "tokenizer": ("minimind_v.data.tokenizer", "TokenizerOptions", "main", "train a byte-level BPE tokenizer"),
    "train": ("minimind_v.train.loop", "TrainOptions", "main", "train a stage: lm, pretrain or sft"),
    "eval": ("minimind_v.evaluate", "EvalOptions", "main", "exact-match evaluation on a QA data set"),
    "chat": ("minimind_v.infer.chat", "ChatOptions", "main", "chat with a model about images"),
    "web": ("minimind_v.infer.web", "WebOptions", "main", "Gradio web UI"),
    "serve": ("minimind_v.infer.serve", "ServeOptions", "main", "OpenAI-compatible HTTP API"),
    "convert import-upstream": ("minimind_v.convert.upstream", "ImportUpstreamOptions", "main",
                                "original MiniMind-V .pth -> model directory"),
    "convert export-hf": ("minimind_v.convert.hf", "ExportHFOptions", "export_main",
                          "model directory -> transformers trust_remote_code directory"),
    "convert import-hf": ("minimind_v.convert.hf", "ImportHFOptions", "import_main",
                          "transformers directory written by export-hf -> model directory"),
    "convert merge-lora": ("minimind_v.convert.lora", "MergeLoraOptions", "main",
                           "model directory + LoRA adapter -> model directory with the adapter merged"),
    "download": ("minimind_v.hub", "DownloadOptions", "main", "fetch real weights and data from the Hugging Face Hub"),
    "bench": ("minimind_v.bench", "BenchOptions", "main", "training and generation throughput"),
    "quickstart": ("minimind_v.quickstart", "QuickstartOptions", "main", "the whole pipeline on the synthetic world"),
}


def _usage(group: str | None = None) -> str:
    """The commands, or those of one group (`convert`)."""
    names = [n for n in COMMANDS if group is None or n.startswith(f"{group} ")]
    width = max(len(name) for name in names)
    head = f"minimind-v {group} <command>" if group else "minimind-v <command>"
    lines = [f"usage: {head} [options]   ({head} --help for its flags)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {COMMANDS[name][3]}" for name in names]
    return "\n".join(lines)


GROUPS = {name.split()[0] for name in COMMANDS if " " in name}


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `minimind-v eval ... | head` ends quietly, as a Unix tool should
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest = _split_command(argv)
    if name is None:
        group = argv[0] if argv and argv[0] in GROUPS else None
        asked = argv[1:] if group else argv
        if not asked or asked[0] in ("-h", "--help"):
            print(_usage(group))
            return 0
        unknown = f"{group} {asked[0]}" if group else asked[0]
        print(f"error: unknown command {unknown!r}\n\n{_usage(group)}", file=sys.stderr)
        return 2
    module_name, options_name, function_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    options_cls = getattr(module, options_name)
    parser = argparse.ArgumentParser(prog=f"minimind-v {name}", description=help_text)
    add_dataclass_args(parser, options_cls)
    try:
        ns = parser.parse_args(rest)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        opts = dataclass_from_args(options_cls, ns)
        result = getattr(module, function_name)(opts)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

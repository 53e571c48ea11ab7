"""The ``lightning-saver`` console command.

``fit``/``validate``/``test``/``predict`` go to LightningCLI (see ``integration/cli.py``); the
tool subcommands below are looked up in a table and imported only when called.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> "module:function"; each function takes the remaining argv and returns an exit code
TOOLS = {
    "inspect": "lightning_saver.commands.inspect:main",
    "convert": "lightning_saver.commands.convert:main",
    "consolidate": "lightning_saver.commands.consolidate:main",
    "export": "lightning_saver.commands.export:main",
}


# every subcommand, one line each, for `lightning-saver --help`
SUMMARY = {
    "fit": "train (LightningCLI): --config FILE; --ckpt_path FILE|last|best resumes",
    "validate": "validate a checkpoint (LightningCLI): --config FILE --ckpt_path FILE|last|best",
    "test": "test a checkpoint (LightningCLI): --config FILE --ckpt_path FILE|last|best",
    "predict": "predict with a checkpoint (LightningCLI): --config FILE --ckpt_path FILE|last|best",
    "inspect": "list a checkpoint's tensors and metadata (safetensors file, TF prefix or directory)",
    "convert": "convert a TF V2 checkpoint to safetensors or back (--name-map FILE renames)",
    "consolidate": "a sharded set's full tensors as one safetensors file (or Hugging Face shards)",
    "export": "export a checkpoint + model class to ONNX and/or a TF MetaGraph",
}


def usage() -> str:
    """The top-level help: every subcommand with its line."""
    width = max(map(len, SUMMARY))
    lines = ["usage: lightning-saver SUBCOMMAND [options]", "",
             "subcommands (`lightning-saver SUBCOMMAND --help` lists the options of one):"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in SUMMARY.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] in TOOLS:
        module_name, func_name = TOOLS[args[0]].split(":")
        # module and function from the fixed TOOLS table; args[0] only picks a key
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args[1:]) or 0)
    from lightning_saver.integration.cli import cli_main

    cli_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

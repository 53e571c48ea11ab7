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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        module_name, func_name = TOOLS[args[0]].split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args[1:]) or 0)
    from lightning_saver.integration.cli import cli_main

    cli_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``lightning-saver inspect PATH``: list a checkpoint's tensors (name, dtype, shape, bytes) and metadata.

PATH is a safetensors file, a TF V2 checkpoint prefix (or its ``.index``), or a directory (its TF
``checkpoint`` file or its newest lightning_saver checkpoint). ``--verify`` also reads every tensor
and checks its checksum; ``--json`` prints one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lightning_saver.commands import _formats
from lightning_saver.errors import LightningSaverError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-saver inspect", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="safetensors file, TF checkpoint prefix, or directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--verify", action="store_true", help="read every tensor and check its checksum")
    _formats.storage_options_arg(parser)
    return parser


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [
            row[0].ljust(widths[0]),
            row[1].ljust(widths[1]),
            row[2].ljust(widths[2]),
            row[3].rjust(widths[3]),
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _splits(path: str) -> dict[str, str]:
    """How a set's tensors are split over its files: ``"2 pieces along dim 0 (4+4)"``."""
    from lightning_saver.saving import sharded

    index = sharded.read_index(path)
    return {name: index.split(name) for name in index.tensors}


def _with_split(path: str, rows: list[tuple[str, str, str, str]]) -> str:
    splits = _splits(path)
    table = _table(rows).splitlines()
    width = max(len(line) for line in table)
    out = [table[0].ljust(width) + "  split"]
    out += [line.ljust(width) + "  " + splits[row[0]] for line, row in zip(table[1:], rows[1:], strict=True)]
    return "\n".join(out)


def main(argv: Sequence[str]) -> int:
    """Run ``inspect``; returns the exit code (1 with a message on stderr for an unreadable path)."""
    args = _parser().parse_args(list(argv))
    try:
        options = args.storage_options
        fmt, path = _formats.detect(args.path, options)
        index = _formats.read_index(fmt, path, options)
        metadata = _formats.read_metadata(fmt, path, options)
        if args.verify:
            _formats.load_all(fmt, path, verify=True, options=options)
    except (LightningSaverError, OSError) as err:
        print(f"lightning-saver inspect: {err}", file=sys.stderr)
        return 1
    total = sum(info.nbytes for info in index.values())
    if args.json:
        tensors = {
            n: {"dtype": i.dtype, "shape": list(i.shape), "nbytes": i.nbytes} for n, i in index.items()
        }
        if fmt == _formats.SET:
            for name, split in _splits(path).items():
                tensors[name]["split"] = split
        body = {"path": path, "format": fmt, "tensors": tensors, "nbytes": total, "metadata": metadata}
        print(json.dumps(body, indent=2))
        return 0
    print(f"{path} ({fmt})")
    rows = [("name", "dtype", "shape", "bytes")]
    rows += [(n, i.dtype, str(tuple(i.shape)), str(i.nbytes)) for n, i in index.items()]
    print(_table(rows) if fmt != _formats.SET else _with_split(path, rows))
    print(f"{len(index)} tensors, {total} bytes" + (", all checksums verified" if args.verify else ""))
    if metadata:
        print("metadata:")
        for key, value in metadata.items():
            print(f"  {key}: {value if len(value) <= 200 else value[:200] + '...'}")
    return 0

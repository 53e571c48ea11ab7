"""``lightning-saver convert SRC DST [--name-map FILE]``: TF V2 checkpoint <-> safetensors.

The direction follows SRC: a TF checkpoint (prefix, ``.index`` or directory) becomes the safetensors
file DST; a safetensors file becomes the TF checkpoint prefix DST. ``--name-map`` is a JSON map (see
``lightning_saver.formats.name_map``) from TF names to torch keys, with the transposes Linear and conv
weights need; it is applied TF -> torch or torch -> TF as the direction requires. TF string tensors
(such as ``_CHECKPOINTABLE_OBJECT_GRAPH``) have no safetensors dtype and are skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence

import torch

from lightning_saver.commands import _formats
from lightning_saver.errors import LightningSaverError
from lightning_saver.formats import safetensors_io, tf_bundle
from lightning_saver.formats.name_map import NameMap


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-saver convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="TF checkpoint prefix / .index / directory, or a safetensors file")
    parser.add_argument("dst", help="safetensors file (from TF) or TF checkpoint prefix (from safetensors)")
    parser.add_argument("--name-map", help="JSON file: {tf_name: torch_name | {name, layout}}")
    parser.add_argument("--no-verify", action="store_true", help="skip checksum checks while reading")
    return parser


def _tf_to_safetensors(src: str, dst: str, name_map: NameMap | None, verify: bool) -> int:
    tensors = _formats.load_all(_formats.TF, src, verify=verify)
    strings = [name for name, value in tensors.items() if not isinstance(value, torch.Tensor)]
    for name in strings:
        del tensors[name]
    if strings:
        print(
            f"skipped {len(strings)} string tensor(s) safetensors cannot hold: {', '.join(strings)}",
            file=sys.stderr,
        )
    if name_map is not None:
        tensors = name_map.to_torch(tensors)
    temp = f"{dst}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        safetensors_io.save_file(tensors, temp, metadata={"converted_from": os.path.basename(src)})
        os.replace(temp, dst)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return len(tensors)


def _safetensors_to_tf(src: str, dst: str, name_map: NameMap | None, verify: bool) -> int:
    tensors = _formats.load_all(_formats.SAFETENSORS, src, verify=verify)
    if name_map is not None:
        tensors = name_map.to_tf(tensors)
    tf_bundle.save_file(tensors, dst)
    return len(tensors)


def main(argv: Sequence[str]) -> int:
    """Run ``convert``; returns the exit code (1 with a message on stderr on failure)."""
    args = _parser().parse_args(list(argv))
    try:
        name_map = NameMap.from_file(args.name_map) if args.name_map else None
        fmt, src = _formats.detect(args.src)
        if fmt == _formats.TF:
            count = _tf_to_safetensors(src, args.dst, name_map, not args.no_verify)
            written = args.dst
        else:
            count = _safetensors_to_tf(src, args.dst, name_map, not args.no_verify)
            written = f"{args.dst}.index + {tf_bundle.data_path(args.dst, 0, 1)}"
    except (LightningSaverError, OSError, ValueError) as err:
        print(f"lightning-saver convert: {err}", file=sys.stderr)
        return 1
    print(f"converted {count} tensors: {src} -> {written}")
    return 0

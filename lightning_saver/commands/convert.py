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
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_saver.commands import _formats
from lightning_saver.errors import LightningSaverError
from lightning_saver.formats import safetensors_io, tf_bundle
from lightning_saver.formats.name_map import NameMap
from lightning_saver.saving.store_io import store_of
from lightning_saver.tf import write_checkpoint


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-saver convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="TF checkpoint prefix / .index / directory, or a safetensors file")
    parser.add_argument("dst", help="safetensors file (from TF) or TF checkpoint prefix (from safetensors)")
    parser.add_argument("--name-map", help="JSON file: {tf_name: torch_name | {name, layout}}")
    parser.add_argument("--no-verify", action="store_true", help="skip checksum checks while reading")
    _formats.storage_options_arg(parser)
    return parser


def _tf_to_safetensors(src: str, dst: str, name_map: NameMap | None, verify: bool,
                       options: Mapping[str, Any] | None) -> int:
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
    store, dst = store_of(dst, options)
    store.makedirs(store.split(dst)[0])
    metadata = {"converted_from": os.path.basename(src)}
    store.write_atomic(dst, lambda sink: _write(tensors, metadata, sink),
                       nbytes=safetensors_io.planned_nbytes(tensors, metadata=metadata))
    return len(tensors)


def _write(tensors: dict[str, torch.Tensor], metadata: dict[str, str], sink: Any) -> Any:
    fd = sink.fileno()
    if fd is not None:
        return safetensors_io.write_to_fd(tensors, fd, metadata=metadata)
    return safetensors_io.write_to_sink(tensors, sink, metadata=metadata)


def _safetensors_to_tf(src: str, dst: str, name_map: NameMap | None, verify: bool,
                       options: Mapping[str, Any] | None) -> int:
    tensors = _formats.load_all(_formats.SAFETENSORS, src, verify=verify, options=options)
    if name_map is not None:
        tensors = name_map.to_tf(tensors)
    write_checkpoint(dst, tensors, storage_options=options)  # atomic, on disk or in a store
    return len(tensors)


def main(argv: Sequence[str]) -> int:
    """Run ``convert``; returns the exit code (1 with a message on stderr on failure)."""
    args = _parser().parse_args(list(argv))
    try:
        name_map = NameMap.from_file(args.name_map) if args.name_map else None
        options = args.storage_options
        fmt, src = _formats.detect(args.src, options)
        if fmt == _formats.TF:
            count = _tf_to_safetensors(src, args.dst, name_map, not args.no_verify, options)
            written = args.dst
        else:
            count = _safetensors_to_tf(src, args.dst, name_map, not args.no_verify, options)
            written = f"{args.dst}.index + {tf_bundle.data_path(args.dst, 0, 1)}"
    except (LightningSaverError, OSError, ValueError) as err:
        print(f"lightning-saver convert: {err}", file=sys.stderr)
        return 1
    print(f"converted {count} tensors: {src} -> {written}")
    return 0

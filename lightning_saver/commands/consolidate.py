"""``lightning-saver consolidate SET OUT.safetensors``: a set's full tensors as ordinary safetensors.

SET is a set's index (``model_95.safetensors.index.json``) or a directory (its newest checkpoint).
By default only the weights are written (a Lightning training state's other tensors, under the
reserved ``__state__/`` prefix, are left out); ``--with-optimizer`` keeps everything. The output is
one file, readable by ``safetensors.torch.load_file`` and loadable into the unsharded model.

With ``--max-shard-size 5GB`` it writes the Hugging Face sharded layout instead, which
``transformers``' ``from_pretrained`` loads: ``<stem>-0000N-of-0000M.safetensors`` files of at most
that size (a larger tensor gets a file of its own) and ``<stem>.safetensors.index.json`` with
``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``, in OUT's directory. Each file
carries ``{"format": "pt"}`` in its metadata, as ``transformers`` expects. Tensors are gathered one
output file at a time, so memory stays near one output file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence

from lightning_saver.errors import LightningSaverError
from lightning_saver.formats import safetensors_io
from lightning_saver.formats.safetensors_header import DTYPES
from lightning_saver.formats.state_codec import RESERVED_PREFIX
from lightning_saver.saving import commit

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
_HF_META = {"format": "pt"}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000 (Hugging Face's spelling)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not match:
        raise ValueError(f"size {text!r} is not a number with an optional unit (e.g. 5GB, 500MiB)")
    return int(float(match[1]) * _UNITS[match[2] or ""])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-saver consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("set", help="a set's index (.safetensors.index.json) or a checkpoint directory")
    parser.add_argument("out", help="output .safetensors file (with --max-shard-size: the layout's stem)")
    parser.add_argument("--with-optimizer", action="store_true",
                        help="keep every tensor (optimizer and training state), not only the weights")
    parser.add_argument("--max-shard-size", default=None,
                        help="write the Hugging Face sharded layout with files of at most this size")
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum check of the shards")
    return parser


def _resolve(path: str) -> str:
    if os.path.isdir(path):
        from lightning_saver.saving.saver import latest_checkpoint

        latest = latest_checkpoint(path)
        if latest is None:
            raise LightningSaverError(f"{path} holds no lightning_saver checkpoint")
        return latest
    return path


def plan_files(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Names grouped into files of at most ``limit`` bytes, in name order (a larger tensor alone)."""
    files: list[list[str]] = []
    used = 0
    for name in sorted(sizes):
        if not files or (used + sizes[name] > limit and files[-1]):
            files.append([])
            used = 0
        files[-1].append(name)
        used += sizes[name]
    return files


def consolidate(set_path: str, out: str, *, with_optimizer: bool = False, max_shard_size: int | None = None,
                verify: bool = True) -> list[str]:
    """Write the set's full tensors to ``out`` (or the HF layout beside it); return the files written."""
    from lightning_saver.saving import sharded

    index = sharded.read_index(set_path)
    wanted = [n for n in index.tensors if with_optimizer or not n.startswith(RESERVED_PREFIX)]
    sizes = {n: math.prod(index.tensors[n].shape) * DTYPES[index.tensors[n].dtype].itemsize for n in wanted}
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    if max_shard_size is None:
        tensors = sharded.load_set(set_path, names_=wanted, verify=verify)
        _write(out, tensors)
        return [out]
    stem = os.path.basename(out)
    stem = stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem
    groups = plan_files(sizes, max_shard_size)
    written, weight_map = [], {}
    for i, group in enumerate(groups):
        name = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write(os.path.join(directory, name), sharded.load_set(set_path, names_=group, verify=verify))
        weight_map.update(dict.fromkeys(group, name))
        written.append(os.path.join(directory, name))
    doc = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    index_path = os.path.join(directory, f"{stem}.safetensors.index.json")
    commit.atomic_write_bytes(index_path, (json.dumps(doc, indent=2) + "\n").encode())
    return [*written, index_path]


def _write(path: str, tensors: dict) -> None:
    nbytes = safetensors_io.planned_nbytes(tensors, metadata=_HF_META)
    commit.atomic_write(path, lambda fd: safetensors_io.write_to_fd(tensors, fd, metadata=_HF_META),
                        nbytes=nbytes)


def main(argv: Sequence[str]) -> int:
    """Run ``consolidate``; returns the exit code (1 with a message on stderr on failure)."""
    args = _parser().parse_args(list(argv))
    try:
        limit = None if args.max_shard_size is None else parse_size(args.max_shard_size)
        files = consolidate(_resolve(args.set), args.out, with_optimizer=args.with_optimizer,
                            max_shard_size=limit, verify=not args.no_verify)
    except (LightningSaverError, OSError, ValueError) as err:
        print(f"lightning-saver consolidate: {err}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0

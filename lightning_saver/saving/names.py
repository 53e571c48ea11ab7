"""Checkpoint file names: the one place that builds, parses and finds step-suffixed names.

Sample names (``save_path`` argument -> file written)::

    ckpts/variable_file            step 95    -> ckpts/variable_file_95.safetensors
    ckpts/variable_file            no step    -> ckpts/variable_file.safetensors
    ckpts/model.safetensors        step 7     -> ckpts/model_7.safetensors
    ckpts/model.st                 step 7     -> ckpts/model_7.st
    ckpts/run.v2/model_3           step 10    -> ckpts/run.v2/model_3_10.safetensors

A sharded checkpoint (a *set*, ``sharded.py``) of step 95 written by 2 processes is three files,
named like TensorFlow's ``.data-00000-of-00002`` shards so that ``ls`` shows the step on each::

    ckpts/model_95-00000-of-00002.safetensors      rank 0's pieces (plain safetensors)
    ckpts/model_95-00001-of-00002.safetensors      rank 1's pieces
    ckpts/model_95.safetensors.index.json          the index: the set's name, written last

A *series* is a directory plus a prefix plus an extension (``ckpts``, ``variable_file``,
``.safetensors``); rotation works per series. A prefix may be a ``str.format`` template whose fields
are filled per save (the Lightning ``Saver``'s ``filename="epoch={epoch}-{val_loss:.2f}"``): its
files, e.g. ``epoch=3-val_loss=0.52_180.safetensors``, are one series, the step still the suffix.
Temporary files of the commit protocol are hidden
names in the same directory, ``.<final name>.<pid>.<token>.tmp``, so scans and users ignore them.
"""

from __future__ import annotations

import functools
import os
import re
import string
from dataclasses import dataclass

from lightning_saver.storage.local import parse_temp_name, temp_name

__all__ = [
    "DEFAULT_EXT",
    "check_step",
    "Series",
    "series_of",
    "checkpoint_path",
    "temp_name",
    "parse_temp_name",
    "INDEX_SUFFIX",
    "set_index_name",
    "shard_name",
    "is_set_index",
    "set_stem",
    "parse_shard_name",
]

DEFAULT_EXT = ".safetensors"
_BOOL_DTYPES = ("bool", "torch.bool")


def check_step(step: int) -> int:
    """``step`` as a non-negative int (numpy and 0-d tensor steps accepted)."""
    if isinstance(step, bool) or str(getattr(step, "dtype", "")) in _BOOL_DTYPES:
        raise TypeError(f"global_step must be an int, found the bool {step!r}")
    if not isinstance(step, int):
        try:
            as_int = int(step)  # numpy / 0-d tensor steps
        except (TypeError, ValueError):
            raise TypeError(f"global_step must be an int, found {type(step).__name__} {step!r}") from None
        if as_int != step:
            raise TypeError(f"global_step must be a whole number, found {step!r}")
        step = as_int
    if step < 0:
        raise ValueError(f"global_step must be >= 0, found {step}")
    return step


@dataclass(frozen=True)
class Series:
    """A directory + prefix + extension whose files are ``<prefix>_<step><ext>`` (or ``<prefix><ext>``)."""

    directory: str
    prefix: str
    ext: str

    def name(self, step: int | None) -> str:
        """The file name (no directory) for ``step``; ``None`` gives the unsuffixed name."""
        return f"{self.prefix}{self.ext}" if step is None else f"{self.prefix}_{check_step(step)}{self.ext}"

    def path(self, step: int | None) -> str:
        """The path for ``step``, joined to the directory as the caller spelled it."""
        return os.path.join(self.directory, self.name(step))

    def parse(self, name: str) -> int | None:
        """The step encoded in a file name of this series, or ``None`` when it is not one.

        Example:
            >>> Series("ckpts", "variable_file", ".safetensors").parse("variable_file_95.safetensors")
            95
        """
        if "{" in self.prefix:
            match = _template_pattern(self.prefix, self.ext).fullmatch(name)
            if match is None:
                return None
            middle = match["step"]
        elif not (name.startswith(self.prefix + "_") and name.endswith(self.ext)):
            return None
        else:
            middle = name[len(self.prefix) + 1 : len(name) - len(self.ext)]
        if not middle.isdigit() or not middle.isascii() or (len(middle) > 1 and middle[0] == "0"):
            return None
        return int(middle)

    def find(self) -> dict[int, str]:
        """Step -> path of every file of this series in the directory (unsuffixed names excluded)."""
        try:
            names = os.listdir(self.directory or ".")
        except FileNotFoundError:
            return {}
        found: dict[int, str] = {}
        for name in names:
            step = self.parse(name)
            if step is not None:
                found[step] = os.path.join(self.directory, name)
        return found


@functools.lru_cache(maxsize=64)
def _template_pattern(template: str, ext: str) -> re.Pattern[str]:
    """``epoch={epoch}-{val_loss:.2f}`` -> a pattern of its file names; each field matches one or more
    characters other than ``/``, the step is the last ``_<digits>`` before the extension."""
    parts = []
    for literal, field, _spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(r"[^/]+?")
    return re.compile("".join(parts) + r"_(?P<step>\d+)" + re.escape(ext))


def series_of(save_path: str | os.PathLike[str]) -> Series:
    """Split a ``save`` path into its series: directory, prefix, extension (default ``.safetensors``).

    Example:
        >>> series_of("ckpts/variable_file")
        Series(directory='ckpts', prefix='variable_file', ext='.safetensors')
    """
    path = os.fspath(save_path)
    directory, base = os.path.split(path)
    if not base or base in (".", ".."):
        raise ValueError(f"save_path {path!r} names a directory; give a file prefix such as 'ckpts/model'")
    prefix, ext = os.path.splitext(base)
    return Series(directory, prefix, ext or DEFAULT_EXT)


def checkpoint_path(save_path: str | os.PathLike[str], global_step: int | None = None) -> str:
    """The file ``save(model, save_path, global_step)`` writes.

    Example:
        >>> checkpoint_path("ckpts/variable_file", 95)
        'ckpts/variable_file_95.safetensors'
    """
    return series_of(save_path).path(global_step)


INDEX_SUFFIX = ".index.json"


def set_index_name(series: Series, step: int | None) -> str:
    """The index file of a set: ``model_95.safetensors.index.json`` (the name the state file records)."""
    return series.name(step) + INDEX_SUFFIX


def shard_name(series: Series, step: int | None, rank: int, world: int) -> str:
    """One rank's shard of a set: ``model_95-00000-of-00002.safetensors`` (ranks count from 0)."""
    stem = series.name(step)[: -len(series.ext)]
    return f"{stem}-{rank:05d}-of-{world:05d}{series.ext}"


def is_set_index(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a set's index (by name; the file is not opened)."""
    return os.fspath(path).endswith(INDEX_SUFFIX)


def set_stem(index_name: str) -> str:
    """``model_95.safetensors.index.json`` -> ``model_95.safetensors``."""
    return index_name[: -len(INDEX_SUFFIX)] if index_name.endswith(INDEX_SUFFIX) else index_name


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<rank>\d{5})-of-(?P<world>\d{5})(?P<ext>\.[^.]+)$")


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """``(set stem, rank, world)`` for a shard name: ``model_95-00001-of-00002.safetensors`` ->
    ``("model_95.safetensors", 1, 2)``; ``None`` for any other name. The stem + ``INDEX_SUFFIX``
    is the set's index."""
    match = _SHARD.match(name)
    if not match:
        return None
    return match["stem"] + match["ext"], int(match["rank"]), int(match["world"])

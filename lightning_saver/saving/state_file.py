"""The directory's state file: which checkpoints are kept, and which is the latest.

It plays the role of TensorFlow's ``checkpoint`` file, as small, human-readable JSON, written with
the commit protocol (temp file, fsync, rename, fsync directory)::

    {
      "format": "lightning_saver.state",
      "version": 1,
      "latest": "variable_file_100.safetensors",
      "series": {
        "variable_file_{step}.safetensors": {
          "next_keep_time": null,
          "checkpoints": [
            {"name": "variable_file_96.safetensors", "step": 96, "wall_time": 1764080000.5, ...},
            ...
          ]
        }
      }
    }

Each checkpoint (one per line) has name, step, wall_time, metric, preserved (kept forever by
keep_every_n_hours), size and checksum (``crc32c:`` of the file's header, which holds the
per-tensor checksums). Names are relative to the directory, so the directory can be moved. When
the file is missing or damaged, readers fall back to scanning the directory for files written by
lightning_saver (:func:`scan_checkpoints`) and a warning names the damaged file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from lightning_saver.errors import DiskFullError, LightningSaverError
from lightning_saver.formats.shard_index import parse_index
from lightning_saver.saving.names import Series, is_set_index, parse_temp_name, set_stem
from lightning_saver.saving.rotation import Record
from lightning_saver.saving.store_io import read_header_at
from lightning_saver.storage import Storage, storage_for

__all__ = [
    "STATE_NAME",
    "SeriesState",
    "DirectoryState",
    "series_key",
    "load_state",
    "save_state",
    "scan_checkpoints",
    "new_directory_id",
    "DIRECTORY_ID_PLACEHOLDER",
    "recover_directory_id",
]

STATE_NAME = "lightning_saver_state.json"
_FORMAT = "lightning_saver.state"
_VERSION = 1
_MAX_STATE_BYTES = 64 << 20  # ~300,000 records; a larger "state file" is not ours
log = logging.getLogger("lightning_saver")


def series_key(series: Series) -> str:
    """The series' key in the state file, a readable pattern: ``variable_file_{step}.safetensors``."""
    return f"{series.prefix}_{{step}}{series.ext}"


@dataclass
class SeriesState:
    checkpoints: list[Record] = field(default_factory=list)
    next_keep_time: float | None = None


@dataclass
class DirectoryState:
    latest: str | None = None
    series: dict[str, SeriesState] = field(default_factory=dict)
    # random id of this directory's state; every checkpoint a saver writes here carries it in its
    # header, which tells a file this directory's savers wrote (and a kill left unrecorded) from a
    # file copied in from elsewhere
    directory_id: str | None = None

    def all_records(self) -> list[Record]:
        """Every recorded checkpoint, oldest wall time first."""
        return sorted((r for s in self.series.values() for r in s.checkpoints), key=lambda r: r.wall_time)


def new_directory_id() -> str:
    return uuid.uuid4().hex[:16]


# as long as (and JSON-encoded as long as) every new_directory_id(): sizes a header before the commit
DIRECTORY_ID_PLACEHOLDER = "0" * 16


def _number(raw: Any, what: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(float(raw)):
        raise ValueError(f"{what} is not a finite number: {str(raw)[:40]}")
    return float(raw)


def _record(raw: Any) -> Record:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ValueError(f"bad checkpoint entry {str(raw)[:120]}")
    name = raw["name"]
    if os.path.basename(name) != name or name in ("", ".", ".."):
        raise ValueError(f"checkpoint name {name!r} is not a plain file name")
    step, metric, size, checksum = raw.get("step"), raw.get("metric"), raw.get("size"), raw.get("checksum")
    if step is not None and not (type(step) is int and step >= 0):
        raise ValueError(f"step of {name!r} is not an int >= 0: {str(step)[:40]}")
    if metric is not None and (isinstance(metric, bool) or not isinstance(metric, (int, float))):
        raise ValueError(f"metric of {name!r} is not a number")
    if size is not None and type(size) is not int:
        raise ValueError(f"size of {name!r} is not an int")
    if checksum is not None and not isinstance(checksum, str):
        raise ValueError(f"checksum of {name!r} is not a string")
    return Record(
        name=name,
        step=step,
        wall_time=_number(raw.get("wall_time"), f"wall_time of {name!r}"),
        metric=None if metric is None else float(metric),
        preserved=raw.get("preserved") is True,
        size=size,
        checksum=checksum,
    )


def _parse(doc: Any) -> DirectoryState:
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError("not a lightning_saver state file")
    version = doc.get("version")
    if type(version) is not int or version < 1:
        raise ValueError(f"invalid state file version {str(version)[:40]}")
    if version > _VERSION:
        raise ValueError(f"state file version {version} is newer than {_VERSION}")
    raw_series = doc.get("series") or {}
    if not isinstance(raw_series, dict):
        raise ValueError("'series' is not an object")
    series = {}
    for key, raw in raw_series.items():
        if not isinstance(raw, dict) or not isinstance(raw.get("checkpoints", []), list):
            raise ValueError(f"series {key!r} is malformed")
        nkt = raw.get("next_keep_time")
        series[key] = SeriesState(
            [_record(r) for r in raw.get("checkpoints", [])],
            None if nkt is None else _number(nkt, "next_keep_time"),
        )
    latest, directory_id = doc.get("latest"), doc.get("directory_id")
    return DirectoryState(
        latest if isinstance(latest, str) else None,
        series,
        directory_id if isinstance(directory_id, str) and directory_id else None,
    )


def load_state(directory: str, store: Storage | None = None) -> DirectoryState | None:
    """The directory's state, or ``None`` when the file is missing or damaged (damage is logged).

    Whatever the file holds (any bytes, nesting, numbers), this returns or logs; it never raises.
    """
    store = store or storage_for(directory)
    path = store.join(directory, STATE_NAME)
    try:
        raw = store.read_bytes(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        log.warning("cannot read checkpoint state file %s (%s); scanning the directory instead", path, exc)
        return None
    try:
        if len(raw) > _MAX_STATE_BYTES:
            raise ValueError(f"larger than {_MAX_STATE_BYTES} bytes")
        return _parse(json.loads(raw.decode("utf-8")))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors
        log.warning("checkpoint state file %s is damaged (%s: %s); scanning the directory instead",
                    path, type(exc).__name__, str(exc)[:200])
        return None


def save_state(directory: str, state: DirectoryState, store: Storage | None = None) -> None:
    """Commit ``state`` as the directory's state file (atomic and durable)."""
    lines = ["{", f'  "format": "{_FORMAT}",', f'  "version": {_VERSION},',
             f'  "directory_id": {json.dumps(state.directory_id)},',
             f'  "latest": {json.dumps(state.latest)},', '  "series": {']
    for i, (key, s) in enumerate(state.series.items()):
        lines += [f"    {json.dumps(key)}: {{", f'      "next_keep_time": {json.dumps(s.next_keep_time)},',
                  '      "checkpoints": [']
        # one checkpoint per line: easy to read and to diff
        lines += [f"        {json.dumps(_fields(r))}{',' if j < len(s.checkpoints) - 1 else ''}"
                  for j, r in enumerate(s.checkpoints)]
        lines += ["      ]", "    }" + ("," if i < len(state.series) - 1 else "")]
    lines += ["  }", "}", ""]
    store = store or storage_for(directory)
    path = store.join(directory, STATE_NAME)
    try:
        store.write_bytes(path, "\n".join(lines).encode("utf-8"))
    except DiskFullError as exc:
        raise DiskFullError(
            exc.errno, f"not enough space to save the state file {path} ({exc.strerror}); the new "
            "checkpoint was removed, earlier checkpoints and the state file are untouched. Free some space, "
            "lower max_to_keep, or save elsewhere", path,
        ) from exc


_RECORD_FIELDS = tuple(f.name for f in fields(Record))


def _fields(record: Record) -> dict[str, Any]:
    # dataclasses.asdict's deep copy, without the copying: the fields are plain values (a third of
    # the state file's encoding on every save)
    return {name: getattr(record, name) for name in _RECORD_FIELDS}


def _set_info(store: Storage, path: str) -> dict[str, Any]:
    index = parse_index(path, store.read_bytes(path))
    return {"global_step": index.global_step, "wall_time": index.wall_time, **index.info}


def scan_checkpoints(
    directory: str, series: Series | None = None, store: Storage | None = None, *,
    directory_id: str | None = None,
) -> list[Record]:
    """Records for the checkpoints lightning_saver wrote in ``directory`` (headers only), oldest first.

    With ``series``, only its files whose header step matches their name; with ``directory_id``,
    only files a saver of this directory wrote (see :class:`DirectoryState`). Files of other tools,
    temporary files and unreadable files are skipped; a damaged file of the series is skipped with
    a warning naming it.
    """
    store = store or storage_for(directory)
    entries = store.listdir(directory)
    found: list[Record] = []
    for name in entries:
        if name == STATE_NAME or name.startswith(".") or parse_temp_name(name) is not None:
            continue
        stem = set_stem(name)  # a sharded set is named by its index
        if series is not None and series.parse(stem) is None and stem != series.name(None):
            continue
        path = store.join(directory, name)
        local = store.local_path(path)
        if local is not None and not os.path.isfile(local):
            continue
        try:
            record = _scan_record(store, path, name, series, directory_id)
        except (LightningSaverError, OSError, ValueError, RecursionError) as exc:
            if series is not None:
                log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        if record is not None:
            found.append(record)
    found.sort(key=lambda r: (r.wall_time, r.step if r.step is not None else -1))
    return found


def recover_directory_id(directory: str, store: Storage | None = None) -> str | None:
    """The directory id in the newest lightning_saver checkpoint of ``directory`` that has one."""
    store = store or storage_for(directory)
    best: tuple[float, str] | None = None
    for record in scan_checkpoints(directory, store=store):
        try:
            path = store.join(directory, record.name)
            info = _set_info(store, path) if is_set_index(record.name) else read_header_at(store, path).info
        except (LightningSaverError, OSError, ValueError, RecursionError):
            continue
        found = info.get("directory_id")
        if isinstance(found, str) and found and (best is None or record.wall_time >= best[0]):
            best = (record.wall_time, found)
    return best[1] if best else None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _scan_record(
    store: Storage, path: str, name: str, series: Series | None, directory_id: str | None
) -> Record | None:
    info = _set_info(store, path) if is_set_index(name) else read_header_at(store, path).info
    wall_time, step = _finite(info.get("wall_time")), info.get("global_step")
    if wall_time is None or not (step is None or (type(step) is int and step >= 0)):
        return None
    if series is not None and set_stem(name) != series.name(step):
        return None  # e.g. prefix "m_5" without a step wrote m_5.safetensors: not step 5 of series "m"
    if directory_id is not None and info.get("directory_id") != directory_id:
        return None
    return Record(name, step, wall_time, _finite(info.get("metric")), size=store.size(path))

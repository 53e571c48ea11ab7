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
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_saver.errors import LightningSaverError
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
]

STATE_NAME = "lightning_saver_state.json"
_FORMAT = "lightning_saver.state"
_VERSION = 1
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

    def all_records(self) -> list[Record]:
        """Every recorded checkpoint, oldest wall time first."""
        return sorted((r for s in self.series.values() for r in s.checkpoints), key=lambda r: r.wall_time)


def _record(raw: Any) -> Record:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ValueError(f"bad checkpoint entry {raw!r}")
    name = raw["name"]
    if os.path.basename(name) != name or name in ("", ".", ".."):
        raise ValueError(f"checkpoint name {name!r} is not a plain file name")
    step = raw.get("step")
    metric = raw.get("metric")
    return Record(
        name=name,
        step=None if step is None else int(step),
        wall_time=float(raw["wall_time"]),
        metric=None if metric is None else float(metric),
        preserved=bool(raw.get("preserved")),
        size=raw.get("size"),
        checksum=raw.get("checksum"),
    )


def _parse(doc: Any) -> DirectoryState:
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError("not a lightning_saver state file")
    if int(doc.get("version", 0)) > _VERSION:
        raise ValueError(f"state file version {doc.get('version')} is newer than {_VERSION}")
    series = {}
    for key, raw in dict(doc.get("series") or {}).items():
        nkt = raw.get("next_keep_time")
        series[str(key)] = SeriesState(
            [_record(r) for r in raw.get("checkpoints", [])], None if nkt is None else float(nkt)
        )
    latest = doc.get("latest")
    return DirectoryState(latest if isinstance(latest, str) else None, series)


def load_state(directory: str, store: Storage | None = None) -> DirectoryState | None:
    """The directory's state, or ``None`` when the file is missing or damaged (damage is logged)."""
    store = store or storage_for(directory)
    path = store.join(directory, STATE_NAME)
    try:
        text = store.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read checkpoint state file %s (%s); scanning the directory instead", path, exc)
        return None
    try:
        return _parse(json.loads(text))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("checkpoint state file %s is damaged (%s); scanning the directory instead", path, exc)
        return None


def save_state(directory: str, state: DirectoryState, store: Storage | None = None) -> None:
    """Commit ``state`` as the directory's state file (atomic and durable)."""
    lines = ["{", f'  "format": "{_FORMAT}",', f'  "version": {_VERSION},',
             f'  "latest": {json.dumps(state.latest)},', '  "series": {']
    for i, (key, s) in enumerate(state.series.items()):
        lines += [f"    {json.dumps(key)}: {{", f'      "next_keep_time": {json.dumps(s.next_keep_time)},',
                  '      "checkpoints": [']
        # one checkpoint per line: easy to read and to diff
        lines += [f"        {json.dumps(asdict(r))}{',' if j < len(s.checkpoints) - 1 else ''}"
                  for j, r in enumerate(s.checkpoints)]
        lines += ["      ]", "    }" + ("," if i < len(state.series) - 1 else "")]
    lines += ["  }", "}", ""]
    store = store or storage_for(directory)
    store.write_bytes(store.join(directory, STATE_NAME), "\n".join(lines).encode("utf-8"))


def _set_info(store: Storage, path: str) -> dict[str, Any]:
    index = parse_index(path, store.read_bytes(path))
    return {"global_step": index.global_step, "wall_time": index.wall_time, **index.info}


def scan_checkpoints(directory: str, series: Series | None = None, store: Storage | None = None
                     ) -> list[Record]:
    """Records for the checkpoints lightning_saver wrote in ``directory`` (headers only), oldest first.

    Files of other tools, temporary files and unreadable files are skipped.
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
            info = _set_info(store, path) if is_set_index(name) else read_header_at(store, path).info
            size = store.size(path)
        except (LightningSaverError, OSError):
            continue
        if not info or not isinstance(info.get("wall_time"), (int, float)):
            continue
        step = info.get("global_step")
        metric = info.get("metric")
        found.append(
            Record(
                name,
                step if isinstance(step, int) else None,
                float(info["wall_time"]),
                float(metric) if isinstance(metric, (int, float)) else None,
                size=size,
            )
        )
    found.sort(key=lambda r: (r.wall_time, r.step if r.step is not None else -1))
    return found

"""Which checkpoints a series owns: the records rotation may delete, read under the directory lock.

Rotation may delete only what these records name: files of the series that the state file records,
plus files of the series whose header carries the directory's id (written there, left unrecorded
by a kill before the state file update, or dropped by a rotation a kill interrupted). A copied-in
checkpoint, a file of another prefix that merely looks like one of the series, or a name a crafted
state file lists outside the series is never touched.

Example::

    whole = directory_state("ckpts", store)
    records = owned_records(Series("ckpts", "model", ".safetensors"), whole, store)
"""

from __future__ import annotations

import logging
import os

from lightning_saver.errors import ConcurrentSaverError
from lightning_saver.saving import names, rotation, state_file
from lightning_saver.saving.names import Series
from lightning_saver.storage import Storage

__all__ = ["directory_state", "check_unchanged", "owned_records", "in_series"]

log = logging.getLogger("lightning_saver")


def directory_state(directory: str, store: Storage) -> state_file.DirectoryState:
    """The directory's state. Without one (none yet, lost or damaged), its id is recovered from the
    newest checkpoint that carries one (a kill can strike before the first state file exists),
    or a new id is made; it becomes durable with the next save's state file."""
    whole = state_file.load_state(directory, store) or state_file.DirectoryState()
    if whole.directory_id is None:
        recovered = state_file.recover_directory_id(directory, store)
        whole.directory_id = recovered or state_file.new_directory_id()
    return whole


def check_unchanged(series: Series, known: state_file.SeriesState | None, mine: list[str]) -> None:
    """Raise when the state file's records of ``series`` are not the ones this saver wrote.

    Raises:
        ConcurrentSaverError: another saver wrote checkpoints of the series meanwhile.
    """
    if known is not None and [r.name for r in known.checkpoints] != mine:
        key = state_file.series_key(series)
        raise ConcurrentSaverError(
            f"another saver wrote checkpoints of {os.path.join(series.directory, key)} since this "
            f"one's last save (the state file {state_file.STATE_NAME} lists "
            f"{[r.name for r in known.checkpoints][-5:]}, this saver wrote {mine[-5:]}). Two savers "
            "writing the same directory and prefix at once would delete each other's checkpoints: "
            "give each its own directory or prefix"
        )


def owned_records(series: Series, whole: state_file.DirectoryState, store: Storage) -> list[rotation.Record]:
    """The series' records that still exist, plus its unrecorded files of this directory, by time."""
    key = state_file.series_key(series)
    known = whole.series.get(key)
    present = set(store.listdir(series.directory))
    records = []
    for r in known.checkpoints if known else []:
        if not in_series(series, r.name):
            log.warning("state file of %s lists %r under series %s; it is not a checkpoint of that "
                        "series, so rotation leaves it alone", series.directory or ".", r.name, key)
        elif r.name in present:
            records.append(r)
    names_known = {r.name for r in records}
    scanned = state_file.scan_checkpoints(series.directory, series, store, directory_id=whole.directory_id)
    adopted = [r for r in scanned if r.name not in names_known]
    if adopted:
        records = sorted(records + adopted, key=lambda r: r.wall_time)
    return records


def in_series(series: Series, name: str) -> bool:
    """Whether ``name`` is a checkpoint (or a sharded set's index) of ``series``."""
    stem = names.set_stem(name)  # a sharded set is named by its index
    return series.parse(stem) is not None or stem == series.name(None)

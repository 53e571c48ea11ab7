"""Which checkpoints to keep: a pure policy over records, with TensorFlow ``train.Saver`` semantics.

The policy sees only records (name, step, wall time, metric, whether already kept forever) and its
settings; it touches no file. The saver does the deleting, and only after the new checkpoint and
the state file are durable.

* ``max_to_keep=N``: the N most recently saved checkpoints are kept (``None`` or ``0``: keep all,
  delete nothing).
* ``keep_every_n_hours=H`` (TensorFlow's rule): when a checkpoint leaves that window and its wall
  time is later than ``next_keep_time``, it is kept forever instead of deleted, and
  ``next_keep_time`` advances by H hours. The saver starts ``next_keep_time`` at its creation time
  plus H hours, and the state file carries it across restarts.
* ``save_top_k=K`` with ``mode``: the K best checkpoints by metric are kept too, in addition to the
  window (``-1``: keep all). Checkpoints without a metric never count among the best.
* A protected name (the checkpoint a run resumed from) is never deleted.

Example:
    >>> recs = [Record(f"m_{s}.safetensors", s, float(s)) for s in range(1, 8)]
    >>> [r.step for r in plan(recs, Policy(max_to_keep=5)).delete]
    [1, 2]
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

__all__ = ["Record", "Policy", "Decision", "plan", "record_save"]


@dataclass(frozen=True)
class Record:
    """One committed checkpoint of a series; ``name`` is the file name within its directory."""

    name: str
    step: int | None
    wall_time: float
    metric: float | None = None
    preserved: bool = False  # kept forever by keep_every_n_hours
    size: int | None = None  # carried for the state file; the policy ignores it
    checksum: str | None = None  # idem


@dataclass(frozen=True)
class Policy:
    """Rotation settings, validated on creation."""

    max_to_keep: int | None = 5
    keep_every_n_hours: float | None = None
    save_top_k: int | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        # checked here, before anything is written: a bad setting must not fail after a file exists
        if self.max_to_keep is not None and not (_is_int(self.max_to_keep) and self.max_to_keep >= 0):
            raise ValueError(f"max_to_keep must be None or an int >= 0, found {self.max_to_keep!r}")
        hours = self.keep_every_n_hours
        if hours is not None and not (_is_real(hours) and math.isfinite(hours) and hours > 0):
            raise ValueError(f"keep_every_n_hours must be None or a number > 0, found {hours!r}")
        if self.save_top_k is not None and not (_is_int(self.save_top_k) and self.save_top_k >= -1):
            raise ValueError(
                f"save_top_k must be None, -1 (keep all) or an int >= 0, found {self.save_top_k!r}"
            )
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', found {self.mode!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Decision:
    """The outcome: ``records`` stay recorded (save order), ``delete`` go, ``next_keep_time`` is carried."""

    records: list[Record]
    delete: list[Record]
    next_keep_time: float | None


def record_save(records: Sequence[Record], new: Record) -> list[Record]:
    """Append ``new`` as the newest record; a record of the same file name is replaced (moved to the end)."""
    return [r for r in records if r.name != new.name] + [new]


def _best(records: Sequence[Record], k: int, mode: str) -> set[str]:
    scored = [(i, r) for i, r in enumerate(records) if r.metric is not None and not math.isnan(r.metric)]
    sign = 1.0 if mode == "min" else -1.0
    # better metric first; among equals the newer one wins
    scored.sort(key=lambda ir: (sign * float(ir[1].metric), -ir[0]))  # type: ignore[arg-type]
    return {r.name for _, r in scored[:k]}


def plan(
    records: Sequence[Record],
    policy: Policy,
    *,
    next_keep_time: float | None = None,
    protected: Collection[str] = (),
) -> Decision:
    """Decide which records to keep and which files to delete.

    Args:
        records: every recorded checkpoint of one series, oldest save first.
        policy: the settings.
        next_keep_time: wall time after which a leaving checkpoint is kept forever
            (``keep_every_n_hours``); ``None`` disables that rule.
        protected: file names that must never be deleted.

    Returns:
        A :class:`Decision`.
    """
    rotating = [r for r in records if not r.preserved]
    if not policy.max_to_keep or policy.save_top_k == -1:
        return Decision(list(records), [], next_keep_time)
    kept = {r.name for r in rotating[-policy.max_to_keep :]}
    if policy.save_top_k:
        kept |= _best(rotating, policy.save_top_k, policy.mode)
    out: list[Record] = []
    delete: list[Record] = []
    for record in records:
        if record.preserved or record.name in kept or record.name in protected:
            out.append(record)
        elif policy.keep_every_n_hours and next_keep_time is not None and record.wall_time > next_keep_time:
            out.append(replace(record, preserved=True))
            next_keep_time += policy.keep_every_n_hours * 3600.0
        else:
            delete.append(record)
    return Decision(out, delete, next_keep_time)

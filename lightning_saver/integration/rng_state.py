"""Capture and restore the random number generators a training run draws from.

Lightning does not save them; without them a resumed run draws other dropout masks and another
shuffling order than the uninterrupted run, and measurably diverges.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def capture() -> dict[str, Any]:
    """This process's torch, numpy, Python ``random`` and (when in use) CUDA generator states."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def capture_all_ranks() -> list[dict[str, Any]]:
    """``capture()`` of every rank, in rank order (a one-element list outside distributed runs)."""
    mine = capture()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def restore(states_by_rank: list[dict[str, Any]], rank: int) -> None:
    """Set this process's generators from the states saved for ``rank``.

    A run resumed on a different number of processes reuses rank 0's states for the extra ranks
    and warns, since it cannot reproduce the original run anyway.
    """
    if rank >= len(states_by_rank):
        warnings.warn(
            f"the checkpoint holds RNG states for {len(states_by_rank)} process(es), this is rank {rank}; "
            "reusing rank 0's states (the resumed run will not be bit-identical)",
            stacklevel=2,
        )
        rank = 0
    states = states_by_rank[rank]
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

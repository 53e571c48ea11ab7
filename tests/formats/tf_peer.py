"""Real TensorFlow writing checkpoints, for the format tests that read what the peer wrote."""

from __future__ import annotations

from typing import Any

import numpy as np


def tf_save(tf: Any, prefix: str, tensors: dict[str, np.ndarray]) -> None:
    """One TF V2 bundle at ``prefix`` holding ``tensors``, written by ``tf.raw_ops.SaveV2``."""
    names = list(tensors)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(tensors[n]) for n in names],
    )

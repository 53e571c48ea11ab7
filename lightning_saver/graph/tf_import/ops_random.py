"""TensorFlow import converters: ops_random."""

from __future__ import annotations

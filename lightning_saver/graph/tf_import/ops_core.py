"""TensorFlow import converters: ops_core."""

from __future__ import annotations

"""TensorFlow import converters: ops_reduce."""

from __future__ import annotations

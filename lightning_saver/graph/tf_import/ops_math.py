"""TensorFlow import converters: ops_math."""

from __future__ import annotations

"""TensorFlow import converters: ops_shape."""

from __future__ import annotations

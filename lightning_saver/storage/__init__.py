"""Storage: local files and fsspec URLs behind one interface (see ``base.py``).

``storage_for(path, storage_options=None)`` is the only constructor the other layers call; it is
implemented in this package by the object-storage work (issue #14). Until then every caller uses
``saving/commit.py`` directly for local files.
"""

from lightning_saver.storage.base import Sink, Storage

__all__ = ["Sink", "Storage"]

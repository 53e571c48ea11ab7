"""Storage: local files and fsspec URLs behind one interface (see ``base.py``).

``storage_for(path, storage_options=None)`` is the only constructor the other layers call::

    storage_for("ckpts/model_95.safetensors")             # LocalStorage()
    storage_for("file:///tmp/ckpts")                      # LocalStorage() (file:// is a local path)
    storage_for("s3://bucket/run/ckpts", {"endpoint_url": "http://127.0.0.1:5000"})  # FsspecStorage

A URL is never turned into a local folder: a URL whose fsspec backend is missing raises
:class:`~lightning_saver.errors.BackendNotInstalledError` naming the package to install.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from lightning_saver.errors import BackendNotInstalledError
from lightning_saver.storage.base import Sink, Storage
from lightning_saver.storage.local import LocalStorage

__all__ = ["Sink", "Storage", "LocalStorage", "storage_for", "is_url", "url_protocol", "local_form"]

_URL = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.\-]*)://")
# the package each common protocol needs, for the error message (fsspec's own table says it too)
_PACKAGES = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
    "abfss": "adlfs", "adl": "adlfs", "hf": "huggingface_hub", "sftp": "paramiko", "ssh": "paramiko",
}
_EXTRAS = {"s3fs": "s3", "gcsfs": "gcs"}
_LOCAL = LocalStorage()


def url_protocol(path: str | os.PathLike[str]) -> str | None:
    """``"s3"`` for ``"s3://b/k"``; ``None`` for a local path (``file://`` counts as local)."""
    match = _URL.match(os.fspath(path)) if isinstance(path, str) else None
    if match is None or match["protocol"].lower() in ("file", "local"):
        return None
    return match["protocol"].lower()


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an object in a store other than the local file system."""
    return url_protocol(path) is not None


def local_form(path: str | os.PathLike[str]) -> str:
    """``path`` as a string, with a ``file://`` prefix removed; URLs are returned unchanged."""
    text = os.fspath(path)
    if url_protocol(text) is None and _URL.match(text):
        return text.split("://", 1)[1]
    return text


def _missing(protocol: str, cause: BaseException) -> BackendNotInstalledError:
    package = _PACKAGES.get(protocol)
    if package is None:
        text = str(cause) or f"no fsspec implementation of {protocol!r}"
        return BackendNotInstalledError(f"cannot open {protocol}:// URLs: {text}")
    extra = _EXTRAS.get(package)
    hint = f"pip install {package}"
    if extra:
        hint = f"pip install 'lightning_saver[{extra}]' (or {hint})"
    return BackendNotInstalledError(
        f"{protocol}:// URLs need the {package} package, which is not installed: {hint}"
    )


def storage_for(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The store that holds ``path``: :class:`LocalStorage` for paths, an fsspec store for URLs.

    Args:
        path: a local path, ``file://`` URL, or any fsspec URL (``s3://``, ``gs://``, ``memory://``).
        storage_options: passed to the fsspec file system (``endpoint_url``, ``key``, ``secret``...).

    Raises:
        BackendNotInstalledError: the URL's backend package (or fsspec itself) is missing; the
            message names what to install. Never falls back to a local folder.
    """
    protocol = url_protocol(path)
    if protocol is None:
        return _LOCAL
    try:
        import fsspec
    except ImportError as exc:
        raise BackendNotInstalledError(
            f"{os.fspath(path)}: URLs need fsspec, which is not installed: pip install 'lightning_saver[s3]' "
            "(or pip install fsspec plus the backend of your store)"
        ) from exc
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise _missing(protocol, exc) from exc
    from lightning_saver.storage.remote import FsspecStorage

    return FsspecStorage.create(cls, protocol, dict(storage_options or {}))

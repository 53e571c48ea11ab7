"""Read and write TensorFlow V2 checkpoints without TensorFlow.

A checkpoint is named by its prefix, as TensorFlow names it: ``model.ckpt-100`` stands for
``model.ckpt-100.index`` and ``model.ckpt-100.data-00000-of-00001``.

Example:
    >>> from lightning_saver.tf import read_checkpoint, write_checkpoint
    >>> write_checkpoint("out/model", {"dense/kernel": torch.ones(3, 2)})
    'out/model'
    >>> read_checkpoint("out/model")["dense/kernel"].shape
    (3, 2)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lightning_saver.formats import tf_bundle, tf_bundle_writer
from lightning_saver.formats.tf_bundle import TensorInfo
from lightning_saver.storage import is_url, storage_for

__all__ = ["read_checkpoint", "write_checkpoint", "list_checkpoint", "TensorInfo"]


def read_checkpoint(
    prefix: str | os.PathLike[str],
    *,
    names: Iterable[str] | None = None,
    framework: str = "numpy",
    verify: bool = True,
    mmap: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read a TF V2 checkpoint written by TensorFlow (``Saver``, ``tf.train.Checkpoint``) or by us.

    Args:
        prefix: checkpoint prefix (``model.ckpt-100``), its ``.index`` file, or a directory with a
            TF ``checkpoint`` state file (its latest checkpoint is read).
        names: read only these tensors; the bytes of the others are never read.
        framework: ``"numpy"`` (bfloat16 comes back as an ``ml_dtypes.bfloat16`` array) or
            ``"torch"`` (``torch.bfloat16``). String tensors are numpy object arrays of ``bytes``.
        verify: check every tensor's CRC-32C (block checksums of the index are always checked).
        mmap: map the data files copy-on-write instead of reading them (faster, no copy; the arrays
            stay writable, writes never reach the file). Don't overwrite the files in place while
            the arrays are alive.
        storage_options: for a URL prefix (``s3://bucket/model.ckpt-100``): the fsspec options. The
            bundle's files are downloaded to a temporary folder first (TF bundles are read whole).

    Returns:
        name -> array or tensor, in name order.

    Raises:
        CheckpointNotFoundError: no ``prefix.index`` or a data shard is missing.
        CorruptCheckpointError: damaged or truncated file; the message names the file and tensor.
        StateMismatchError: a name in ``names`` is not in the checkpoint.

    Example:
        >>> read_checkpoint("model.ckpt", names=["global_step"])
        {'global_step': array(100)}
    """
    if is_url(prefix):
        with tempfile.TemporaryDirectory(prefix="lightning_saver-tf-") as work:
            local = _download_bundle(os.fspath(prefix), storage_options, work)
            return tf_bundle.load_file(local, names=names, verify=verify, framework=framework)
    return tf_bundle.load_file(prefix, names=names, verify=verify, framework=framework, mmap=mmap)


def _download_bundle(prefix: str, storage_options: Mapping[str, Any] | None, work: str,
                     index_only: bool = False) -> str:
    """Copy ``prefix.index`` (and its data shards) from a store into ``work``; the local prefix."""
    store = storage_for(prefix, storage_options)
    prefix = prefix[: -len(".index")] if prefix.endswith(".index") else prefix
    directory, base = store.split(prefix)
    wanted = [base + ".index"]
    if not index_only:
        wanted += [n for n in store.listdir(directory) if n.startswith(base + ".data-")]
    for name in wanted:
        with open(os.path.join(work, name), "wb") as f:
            f.write(store.read_bytes(store.join(directory, name)))
    return os.path.join(work, base)


def write_checkpoint(
    prefix: str | os.PathLike[str], tensors: Mapping[str, Any], *, max_shard_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``tensors`` as a TF V2 checkpoint, atomically (one data shard unless ``max_shard_bytes``).

    ``tf.train.load_checkpoint(prefix)`` and a TF1 ``Saver.restore`` read it bit-exact.

    Args:
        prefix: where to write; ``prefix.index`` and ``prefix.data-00000-of-00001`` are created.
        tensors: name -> torch tensor, numpy array (any TF dtype, ``ml_dtypes.bfloat16`` included),
            or bytes / str / numpy arrays of them for string tensors.
        max_shard_bytes: split the data into shards of at most this size (``prefix.data-00000-of-00002``
            and so on); a tensor bigger than that gets a shard of its own.
        storage_options: for a URL prefix (``s3://bucket/model``): the fsspec options.

    Returns:
        The prefix.

    Raises:
        EncodingError: a value is not a tensor, or its dtype has no TensorFlow DataType.
        DiskFullError: the disk filled up; nothing was replaced.

    Example:
        >>> write_checkpoint("out/model", {"dense/kernel": np.zeros((3, 2), np.float32)})
        'out/model'
    """
    prefix = os.fspath(prefix)
    store = storage_for(prefix, storage_options)
    directory, base = store.split(prefix)
    store.makedirs(directory)
    written: list[str] = []

    def commit(path: str, produce: Callable[[Any], Any]) -> Any:
        written.append(store.split(path)[1])
        return store.write_atomic(path, produce)

    tf_bundle.save_file(tensors, prefix, max_shard_bytes=max_shard_bytes, commit=commit)
    # data files of an older bundle under this prefix with another shard count: only now, with the
    # new index in place
    for name in tf_bundle_writer.stale_data_files(base, store.listdir(directory), written):
        store.delete(store.join(directory, name))
    return prefix


def list_checkpoint(
    prefix: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, TensorInfo]:
    """Name -> ``TensorInfo(dtype, shape, nbytes)`` of every tensor, reading only the index
    (for a URL prefix, only the ``.index`` object is downloaded).

    Example:
        >>> list_checkpoint("out/model")
        {'dense/kernel': TensorInfo(dtype='float32', shape=(3, 2), nbytes=24)}
    """
    if is_url(prefix):
        with tempfile.TemporaryDirectory(prefix="lightning_saver-tf-") as work:
            return tf_bundle.read_index(_download_bundle(os.fspath(prefix), storage_options, work, True))
    return tf_bundle.read_index(prefix)

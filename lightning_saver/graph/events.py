"""Write a GraphDef to a TensorBoard event file, so ``tensorboard --logdir`` shows the graph.

An event file is a TFRecord stream of ``Event`` protos: each record is the length (uint64, little
endian), its masked CRC-32C, the bytes, and their masked CRC-32C. The first event names the file
version; the graph goes in ``Event.graph_def`` as serialized bytes.

Example::

    path = write_graph_event(meta.graph_def, "lightning_logs/version_0")
    # tensorboard --logdir lightning_logs   -> the Graphs tab
"""

from __future__ import annotations

import os
import socket
import struct
import time

from tensorboard.compat.proto import event_pb2, graph_pb2

from lightning_saver.formats import masked_crc

__all__ = ["write_graph_event"]


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc.masked(length)) + data
            + struct.pack("<I", masked_crc.masked(data)))


def write_graph_event(graph_def: graph_pb2.GraphDef, log_dir: str | os.PathLike[str], *,
                      step: int = 0) -> str:
    """Write ``graph_def`` as a new event file in ``log_dir`` (created if missing).

    Args:
        graph_def: the graph to show.
        log_dir: the run's log directory (a ``TensorBoardLogger``'s ``log_dir``).
        step: the step recorded with the graph event.

    Returns:
        The path of the event file (``events.out.tfevents.<time>.<host>.<pid>.graph``).

    Example::

        write_graph_event(graph_def, "runs/exp1")
    """
    os.makedirs(log_dir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.graph"
    path = os.path.join(os.fspath(log_dir), name)
    header = event_pb2.Event(wall_time=now, file_version="brain.Event:2")
    graph = event_pb2.Event(wall_time=now, step=step, graph_def=graph_def.SerializeToString())
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(_record(header.SerializeToString()) + _record(graph.SerializeToString()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path

"""Files from TensorFlow's own savers: TF1 Saver (ref and resource variables, Adam slots, global_step),
tf.train.Checkpoint, multi-shard bundles; and a TF1 Saver.restore of a file we wrote."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf  # a pinned test dependency: imported, never skipped
from tf_peer import tf_save

from lightning_saver.errors import CheckpointNotFoundError, CorruptCheckpointError
from lightning_saver.formats import sstable
from lightning_saver.tf import list_checkpoint, read_checkpoint, write_checkpoint

v1 = tf.compat.v1


def _tf1_graph(use_resource: bool):
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 3])
        with v1.variable_scope("dense"):
            kernel = v1.get_variable("kernel", [3, 2], use_resource=use_resource)
            bias = v1.get_variable("bias", [2], initializer=v1.ones_initializer(), use_resource=use_resource)
        counts = v1.get_variable("counts", [4], dtype=tf.int64, initializer=v1.zeros_initializer())
        step = v1.train.get_or_create_global_step()
        loss = tf.reduce_sum(tf.matmul(x, kernel) + bias)
        train = v1.train.AdamOptimizer(0.1).minimize(loss, global_step=step)
        saver = v1.train.Saver()
        init = v1.global_variables_initializer()
    return graph, x, train, saver, init, counts


@pytest.mark.parametrize("use_resource", [False, True], ids=["ref", "resource"])
def test_tf1_saver_with_adam_slots_and_global_step(tmp_path, use_resource):
    graph, x, train, saver, init, _ = _tf1_graph(use_resource)
    with v1.Session(graph=graph) as sess:
        sess.run(init)
        for _ in range(3):
            sess.run(train, {x: np.ones((2, 3), np.float32)})
        path = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=3)
        values = {v.op.name: sess.run(v) for v in v1.global_variables()}
    assert path.endswith("model.ckpt-3")
    got = read_checkpoint(path)
    assert set(got) == set(values)
    assert {"dense/kernel/Adam", "dense/kernel/Adam_1", "beta1_power", "global_step"} <= set(got)
    for name, value in values.items():
        assert got[name].dtype == value.dtype and got[name].tobytes() == np.asarray(value).tobytes(), name
    assert got["global_step"] == 3
    # a directory with TF's "checkpoint" state file resolves to its latest checkpoint
    assert list(read_checkpoint(tmp_path, names=["global_step"])) == ["global_step"]


@pytest.mark.parametrize("use_resource", [False, True], ids=["ref", "resource"])
def test_tf1_saver_restores_what_we_wrote(tmp_path, use_resource):
    graph, _, _, saver, init, _ = _tf1_graph(use_resource)
    with v1.Session(graph=graph) as sess:
        sess.run(init)
        names = {v.op.name: v for v in v1.global_variables()}
        shapes = {n: (tuple(v.shape), v.dtype.base_dtype.as_numpy_dtype) for n, v in names.items()}
    rng = np.random.default_rng(1)
    ours = {
        n: rng.standard_normal(s).astype(d) if d != np.int64 else np.arange(np.prod(s), dtype=d).reshape(s)
        for n, (s, d) in shapes.items()
    }
    prefix = write_checkpoint(tmp_path / "ours", ours)
    with v1.Session(graph=graph) as sess:
        saver.restore(sess, prefix)
        for name, var in names.items():
            assert np.asarray(sess.run(var)).tobytes() == ours[name].tobytes(), name


def test_tf2_checkpoint_object_graph(tmp_path):
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3, name="fc")])
    ckpt = tf.train.Checkpoint(model=model, step=tf.Variable(5, dtype=tf.int64), tag=tf.Variable("run-1"))
    path = ckpt.write(str(tmp_path / "ckpt"))
    got = read_checkpoint(path)
    reader = tf.train.load_checkpoint(path)
    assert set(got) == set(reader.get_variable_to_shape_map())
    for name, value in got.items():
        theirs = reader.get_tensor(name)
        if value.dtype == object:
            assert value.item() == theirs
        else:
            assert value.tobytes() == np.asarray(theirs).tobytes(), name
    assert got["step/.ATTRIBUTES/VARIABLE_VALUE"] == 5


def _tf_multi_shard(prefix: str, shards: list[dict[str, np.ndarray]]) -> None:
    # the way a sharded Saver writes: one bundle per shard under temporary names, then a merge
    parts = []
    for i, tensors in enumerate(shards):
        part = tf.raw_ops.ShardedFilename(basename=prefix + "_temp/part", shard=i, num_shards=len(shards))
        tf_save(tf, part, tensors)
        parts.append(part)
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=prefix, delete_old_dirs=True)


def test_multi_shard_bundle(tmp_path):
    prefix = str(tmp_path / "sharded")
    shards = [
        {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "z": np.array([b"s"], dtype=object)},
        {"m": np.arange(4, dtype=np.int64), "b": np.array(2.5)},
    ]
    _tf_multi_shard(prefix, shards)
    assert (tmp_path / "sharded.data-00001-of-00002").exists()
    got = read_checkpoint(prefix)
    for tensors in shards:
        for name, value in tensors.items():
            if value.dtype == object:
                assert list(got[name]) == list(value)
            else:
                assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes()
    assert list_checkpoint(prefix)["m"].shape == (4,)
    (tmp_path / "sharded.data-00001-of-00002").unlink()
    assert read_checkpoint(prefix, names=["a"])["a"].shape == (2, 3)  # only shard 0 is needed
    with pytest.raises(CheckpointNotFoundError, match=r"sharded\.data-00001-of-00002 is missing"):
        read_checkpoint(prefix, names=["m"])


def test_we_write_multi_shard_tf_reads_it(tmp_path):
    tensors = {f"w{i}": np.full((100, 10), i, np.float32) for i in range(5)}  # 4000 bytes each
    tensors["s"] = np.array([b"text"], dtype=object)
    prefix = write_checkpoint(tmp_path / "m", tensors, max_shard_bytes=9000)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m.data-00000-of-00003", "m.data-00001-of-00003", "m.data-00002-of-00003", "m.index"]
    reader = tf.train.load_checkpoint(prefix)
    for name, value in tensors.items():
        theirs = reader.get_tensor(name)
        assert (list(theirs) == list(value)) if value.dtype == object else theirs.tobytes() == value.tobytes()
    # rewriting with one shard replaces the three and removes the stale ones
    write_checkpoint(prefix, {"w0": tensors["w0"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.data-00000-of-00001", "m.index"]
    assert tf.train.load_checkpoint(prefix).get_tensor("w0").tobytes() == tensors["w0"].tobytes()


@pytest.mark.parametrize("use_resource", [False, True], ids=["ref", "resource"])
def test_tf1_partitioned_variables(tmp_path, use_resource):
    graph = tf.Graph()
    with graph.as_default():
        emb = v1.get_variable(
            "emb", [10, 4], partitioner=v1.fixed_size_partitioner(3), use_resource=use_resource
        )
        wide = v1.get_variable("wide", [3, 70], dtype=tf.float64, use_resource=use_resource,
                               partitioner=v1.fixed_size_partitioner(2, axis=1))  # fmt: skip
        saver = v1.train.Saver()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            prefix = saver.save(sess, str(tmp_path / "part"))
            full = sess.run({"emb": tf.concat(list(emb), 0), "wide": tf.concat(list(wide), 1)})
    reader = tf.train.load_checkpoint(prefix)
    got = read_checkpoint(prefix)
    assert set(got) == {"emb", "wide"}
    for name, value in full.items():
        assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes()
        assert got[name].tobytes() == reader.get_tensor(name).tobytes()
    assert list_checkpoint(prefix)["wide"] == ("float64", (3, 70), 3 * 70 * 8)
    assert read_checkpoint(prefix, names=["emb"], framework="torch", mmap=True)["emb"].shape == (10, 4)
    # drop one slice's entry from TF's index: the variable can no longer be assembled
    items = sstable.read_table((tmp_path / "part.index").read_bytes())
    kept = [
        (k, v) for k, v in items if not k.startswith(b"\x00emb\x00\x01") or k.endswith(b"\x80\x84\x80\x84")
    ]
    (tmp_path / "cut.index").write_bytes(sstable.build_table(kept))
    (tmp_path / "cut.data-00000-of-00001").write_bytes((tmp_path / "part.data-00000-of-00001").read_bytes())
    with pytest.raises(
        CorruptCheckpointError, match=r"cut\.index: tensor 'emb' lists 3 slices but 1 are stored"
    ):
        read_checkpoint(tmp_path / "cut", names=["emb"])
    assert read_checkpoint(tmp_path / "cut", names=["wide"])["wide"].shape == (3, 70)

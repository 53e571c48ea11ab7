import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_saver.saving.rotation import Policy, Record, plan, record_save


def recs(*steps, t0=0.0, dt=1.0):
    return [Record(f"m_{s}.safetensors", s, t0 + i * dt) for i, s in enumerate(steps)]


def steps_of(records):
    return [r.step for r in records]


def test_keeps_the_newest_max_to_keep():
    d = plan(recs(1, 2, 3, 4, 5, 6, 7), Policy(max_to_keep=5))
    assert steps_of(d.records) == [3, 4, 5, 6, 7]
    assert steps_of(d.delete) == [1, 2]


@pytest.mark.parametrize("n", [None, 0])
def test_none_or_zero_keeps_everything(n):
    d = plan(recs(*range(20)), Policy(max_to_keep=n))
    assert d.delete == [] and len(d.records) == 20


def test_newest_means_most_recently_saved_not_highest_step():
    # a run resumed from step 3 saves 4 again: the old 9 and 8 are the oldest saves now
    records = recs(7, 8, 9)
    for s in (4, 5):
        records = record_save(records, Record(f"m_{s}.safetensors", s, 10.0 + s))
    assert steps_of(plan(records, Policy(max_to_keep=3)).records) == [9, 4, 5]


def test_resaving_a_name_moves_it_to_the_end():
    records = record_save(recs(1, 2, 3), Record("m_1.safetensors", 1, 99.0))
    assert steps_of(records) == [2, 3, 1]
    assert steps_of(plan(records, Policy(max_to_keep=2)).delete) == [2]


def test_keep_every_n_hours_tensorflow_rule():
    # saves every 20 minutes for 3 hours, keep_every_n_hours=1, saver created at t=0:
    # TF keeps a leaving checkpoint when its time > next_keep_time, then next_keep_time += 1h.
    hour = 3600.0
    records, next_keep = [], 1 * hour
    policy = Policy(max_to_keep=2, keep_every_n_hours=1)
    deleted = []
    for i in range(1, 10):
        records = record_save(records, Record(f"m_{i}.safetensors", i, i * 1200.0))
        d = plan(records, policy, next_keep_time=next_keep)
        records, next_keep = d.records, d.next_keep_time
        deleted += steps_of(d.delete)
    # times: step i at i*20min. Leaving in order 1..7; 1 (20m), 2 (40m), 3 (60m, not > 60m) deleted;
    # 4 (80m > 60m) kept, next 120m; 5, 6 (120m, not >) deleted; 7 (140m > 120m) kept, next 180m.
    assert deleted == [1, 2, 3, 5, 6]
    assert [r.step for r in records if r.preserved] == [4, 7]
    assert steps_of(records) == [4, 7, 8, 9]
    assert next_keep == 3 * hour


def test_top_k_keeps_the_best_by_metric_as_well():
    records = [Record(f"m_{s}.safetensors", s, float(s), metric=m)
               for s, m in [(1, 0.5), (2, 0.1), (3, 0.9), (4, 0.3), (5, 0.8), (6, 0.7)]]
    d = plan(records, Policy(max_to_keep=1, save_top_k=2, mode="min"))
    assert steps_of(d.records) == [2, 4, 6]
    d = plan(records, Policy(max_to_keep=1, save_top_k=2, mode="max"))
    assert steps_of(d.records) == [3, 5, 6]
    assert plan(records, Policy(max_to_keep=1, save_top_k=-1)).delete == []


def test_records_without_metric_never_count_as_best():
    records = [Record("a", 1, 1.0, metric=None), Record("b", 2, 2.0, metric=float("nan")),
               Record("c", 3, 3.0, metric=5.0), Record("d", 4, 4.0)]
    assert [r.name for r in plan(records, Policy(max_to_keep=1, save_top_k=1)).records] == ["c", "d"]


def test_protected_names_are_never_deleted():
    d = plan(recs(1, 2, 3, 4), Policy(max_to_keep=1), protected={"m_1.safetensors"})
    assert steps_of(d.records) == [1, 4] and steps_of(d.delete) == [2, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_to_keep": -1}, "max_to_keep must be None or an int >= 0, found -1"),
     ({"max_to_keep": 2.5}, "max_to_keep must be None or an int >= 0, found 2.5"),
     ({"max_to_keep": True}, "max_to_keep must be None or an int >= 0, found True"),
     ({"keep_every_n_hours": 0}, "keep_every_n_hours must be None or a number > 0, found 0"),
     ({"keep_every_n_hours": float("nan")}, "keep_every_n_hours must be None or a number > 0, found nan"),
     ({"keep_every_n_hours": "2"}, "keep_every_n_hours must be None or a number > 0, found '2'"),
     ({"save_top_k": -2}, "save_top_k must be None, -1"),
     ({"save_top_k": 1.5}, "save_top_k must be None, -1"),
     ({"mode": "best"}, "mode must be 'min' or 'max', found 'best'")],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Policy(**kwargs)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.integers(0, 30), max_size=40), max_to_keep=st.integers(0, 8))
def test_any_sequence_keeps_exactly_the_newest_distinct_saves(steps, max_to_keep):
    records, on_disk = [], set()
    for i, s in enumerate(steps):
        records = record_save(records, Record(f"m_{s}.safetensors", s, float(i)))
        on_disk.add(s)
        d = plan(records, Policy(max_to_keep=max_to_keep))
        records = d.records
        on_disk -= set(steps_of(d.delete))
    # reference: the last max_to_keep distinct steps in order of their latest save
    latest_order = list(dict.fromkeys(reversed(steps)))
    expected = set(latest_order if max_to_keep == 0 else latest_order[:max_to_keep])
    assert on_disk == expected == set(steps_of(records))


class _Clock:
    """A settable wall clock standing in for the ``time`` module of the saver under test."""

    def __init__(self):
        import time as real

        self._real = real
        self.now = 1_000_000.0

    def time(self):
        return self.now

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize(
    "max_to_keep, hours, gaps_minutes",
    [(2, 1.0, [20] * 18),
     (1, 0.5, [7, 50, 3, 31, 29, 90, 1, 1, 45, 20, 33]),
     (3, 2.0, [25] * 20 + [300, 5, 5])],
)
def test_keep_every_n_hours_keeps_the_same_files_as_tensorflow(tmp_path, monkeypatch, max_to_keep, hours,
                                                               gaps_minutes):
    import tensorflow as tf
    from tensorflow.python.training import saver as tf_saver_module

    from lightning_saver.saving import saver as our_saver_module
    from lightning_saver.saving.saver import CheckpointSaver

    clock = _Clock()
    monkeypatch.setattr(tf_saver_module, "time", clock)
    monkeypatch.setattr(our_saver_module, "time", clock)
    with tf.Graph().as_default():
        var = tf.compat.v1.Variable(1.0)
        tf_saver = tf.compat.v1.train.Saver(max_to_keep=max_to_keep, keep_checkpoint_every_n_hours=hours)
        ours = CheckpointSaver(max_to_keep=max_to_keep, keep_every_n_hours=hours)
        with tf.compat.v1.Session() as sess:
            sess.run(var.initializer)
            for step, gap in enumerate(gaps_minutes, start=1):
                clock.now += gap * 60.0
                tf_saver.save(sess, str(tmp_path / "tf" / "model"), global_step=step, write_meta_graph=False)
                ours.save({"v": torch.ones(1)}, str(tmp_path / "ours" / "model"), global_step=step)
    tf_kept = sorted(int(p.name[6:-6]) for p in (tmp_path / "tf").glob("model-*.index"))  # model-{step}.index
    our_kept = sorted(int(p.stem[len("model_"):]) for p in (tmp_path / "ours").glob("model_*.safetensors"))
    assert our_kept == tf_kept
    assert len(tf_kept) > max_to_keep  # the scenario does preserve some checkpoints

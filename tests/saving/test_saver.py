import json
import os
import tempfile

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_saver
from lightning_saver import Saver, latest_checkpoint
from lightning_saver.saving.saver import read_metadata
from lightning_saver.saving.state_file import STATE_NAME


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(4)


def files(d):
    return sorted(p for p in os.listdir(d) if not p.startswith("."))


def test_save_returns_the_tf_style_name_and_plain_tools_read_it(tmp_path):
    model = nn.Linear(3, 2)
    path = Saver().save(model, str(tmp_path / "variable_file"), global_step=95)
    assert path == str(tmp_path / "variable_file_95.safetensors")
    plain = safetensors.torch.load_file(path)
    assert plain.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(plain[k], v)


def test_save_without_step_uses_the_path_as_given(tmp_path):
    saver = Saver()
    written = saver.save({"a": torch.ones(2)}, str(tmp_path / "weights"))
    assert written == str(tmp_path / "weights.safetensors")
    assert saver.save({"a": torch.ones(2)}, str(tmp_path / "w.bin")) == str(tmp_path / "w.bin")


def test_max_to_keep_rotation_and_state_file(tmp_path):
    saver = Saver(max_to_keep=5)
    model = nn.Linear(2, 2)
    for step in range(1, 101):
        saver.save(model, str(tmp_path / "variable_file"), global_step=step)
    expected = [f"variable_file_{s}.safetensors" for s in range(96, 101)]
    assert files(tmp_path) == sorted(expected + [STATE_NAME])
    assert saver.last_checkpoints == [str(tmp_path / n) for n in expected]
    state = json.loads((tmp_path / STATE_NAME).read_text())
    assert state["latest"] == "variable_file_100.safetensors"
    entries = state["series"]["variable_file_{step}.safetensors"]["checkpoints"]
    assert [e["step"] for e in entries] == [96, 97, 98, 99, 100]
    assert all(e["size"] == os.path.getsize(tmp_path / e["name"]) for e in entries)
    assert all(e["checksum"].startswith("crc32c:") for e in entries)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "variable_file_100.safetensors")


def test_rotation_survives_restarts_and_leaves_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    safetensors.torch.save_file({"a": torch.ones(1)}, str(tmp_path / "variable_file_1.safetensors"))
    for start in (2, 5, 8):  # three "processes"
        saver = Saver(max_to_keep=2)
        for step in range(start, start + 3):
            saver.save({"w": torch.full((2,), 1.0 * step)}, str(tmp_path / "variable_file"), global_step=step)
    # step 1 was written by another tool: never touched
    assert files(tmp_path) == sorted(["notes.txt", STATE_NAME, "variable_file_1.safetensors",
                                      "variable_file_9.safetensors", "variable_file_10.safetensors"])


def test_rotation_continues_when_the_state_file_is_lost(tmp_path):
    saver = Saver(max_to_keep=3)
    for step in range(5):
        saver.save({"w": torch.zeros(1)}, str(tmp_path / "m"), global_step=step)
    (tmp_path / STATE_NAME).write_text("{ damaged")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "m_4.safetensors")
    Saver(max_to_keep=3).save({"w": torch.zeros(1)}, str(tmp_path / "m"), global_step=5)
    assert files(tmp_path) == sorted([STATE_NAME, "m_3.safetensors", "m_4.safetensors", "m_5.safetensors"])


def test_rotation_is_per_prefix(tmp_path):
    saver = Saver(max_to_keep=1)
    for step in range(3):
        saver.save({"w": torch.zeros(1)}, str(tmp_path / "a"), global_step=step)
        saver.save({"w": torch.zeros(1)}, str(tmp_path / "b"), global_step=step)
    assert files(tmp_path) == sorted([STATE_NAME, "a_2.safetensors", "b_2.safetensors"])
    assert latest_checkpoint(tmp_path) == str(tmp_path / "b_2.safetensors")
    assert latest_checkpoint(tmp_path, "a") == str(tmp_path / "a_2.safetensors")


def test_protected_checkpoint_survives_rotation(tmp_path):
    saver = Saver(max_to_keep=2)
    first = saver.save({"w": torch.zeros(1)}, str(tmp_path / "m"), global_step=0)
    saver.protect(first)
    for step in range(1, 5):
        saver.save({"w": torch.zeros(1)}, str(tmp_path / "m"), global_step=step)
    assert os.path.exists(first)
    assert files(tmp_path) == sorted([STATE_NAME, "m_0.safetensors", "m_3.safetensors", "m_4.safetensors"])


def test_tied_weights_come_back_tied_and_restore_in_place(tmp_path):
    src, dst = Tied(), Tied()
    nn.init.normal_(src.embed.weight)
    src.norm.running_mean.fill_(3.0)
    path = Saver().save(src, str(tmp_path / "tied"), global_step=1)
    plain = safetensors.torch.load_file(path)  # plain tools see every key
    assert torch.equal(plain["head.weight"], plain["embed.weight"])
    loaded = lightning_saver.load(path)
    assert loaded["head.weight"] is loaded["embed.weight"]
    weight = dst.embed.weight
    Saver().restore(dst, path)
    assert dst.embed.weight is weight and dst.head.weight is dst.embed.weight
    assert torch.equal(dst.embed.weight, src.embed.weight)
    assert torch.equal(dst.norm.running_mean, src.norm.running_mean)


def test_restore_fills_a_mapping_and_strict_false_skips_keys(tmp_path):
    path = Saver().save({"a": torch.arange(3.0), "b": torch.ones(2)}, str(tmp_path / "m"))
    empty = {}
    Saver().restore(empty, path)
    assert set(empty) == {"a", "b"} and torch.equal(empty["a"], torch.arange(3.0))
    target = {"a": torch.zeros(3), "c": torch.zeros(1)}
    result = Saver().restore(target, path, strict=False)
    assert torch.equal(target["a"], torch.arange(3.0))
    assert result.missing_keys == ["c"] and result.unexpected_keys == ["b"]


def test_metadata_records_step_time_versions_and_caller_entries(tmp_path):
    path = Saver().save(nn.Linear(1, 1), str(tmp_path / "m"), global_step=7, metadata={"run": "abc"})
    meta = read_metadata(path)
    assert meta["run"] == "abc" and meta["format"] == "pt"
    ours = json.loads(meta["lightning_saver"])
    assert ours["global_step"] == 7 and ours["format_version"] == 1
    assert ours["versions"]["torch"] == torch.__version__.split("+")[0]
    assert ours["checksum"]["algorithm"] == "crc32c"
    assert set(ours["checksum"]["tensors"]) == {"weight", "bias"}


def test_restore_accepts_the_path_without_extension(tmp_path):
    Saver().save({"x": torch.tensor(5.0)}, str(tmp_path / "variable_file"))
    x = {"x": torch.tensor(0.0)}
    Saver().restore(x, str(tmp_path / "variable_file"))
    assert x["x"].item() == 5.0


def test_leftover_temp_files_are_removed_by_a_new_saver(tmp_path):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead_pid = child.pid  # a writer that is gone
    stale = tmp_path / f".m_3.safetensors.{dead_pid}.0123abcd.tmp"
    live = tmp_path / f".m_4.safetensors.{os.getppid()}.89abcdef.tmp"  # a live writer: left alone
    other = tmp_path / ".cache.tmp"  # not ours: left alone
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    Saver().save({"w": torch.zeros(1)}, str(tmp_path / "m"), global_step=5)
    assert not stale.exists() and live.exists() and other.exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(st.integers(0, 12), st.sampled_from(["restart", "lose_state"])), max_size=14),
       max_to_keep=st.integers(0, 4))
def test_any_steps_and_restarts_keep_exactly_the_newest_files(ops, max_to_keep):
    with tempfile.TemporaryDirectory() as d:
        saver = Saver(max_to_keep=max_to_keep)
        saved = []
        for op in ops:
            if op == "restart":
                saver = Saver(max_to_keep=max_to_keep)
            elif op == "lose_state":
                if os.path.exists(os.path.join(d, STATE_NAME)):
                    os.remove(os.path.join(d, STATE_NAME))
                saver = Saver(max_to_keep=max_to_keep)
            else:
                saver.save({"w": torch.full((2,), float(op))}, os.path.join(d, "m"), global_step=op)
                saved.append(op)
        newest_first = list(dict.fromkeys(reversed(saved)))
        expected = newest_first if max_to_keep == 0 else newest_first[:max_to_keep]
        on_disk = [n for n in files(d) if n != STATE_NAME]
        assert sorted(on_disk) == sorted(f"m_{s}.safetensors" for s in expected)
        if saved:
            latest = latest_checkpoint(d)
            assert latest == os.path.join(d, f"m_{saved[-1]}.safetensors")
            assert lightning_saver.load(latest)["w"][0].item() == float(saved[-1])


def test_save_top_k_keeps_the_best_across_restarts(tmp_path):
    metrics = [0.9, 0.2, 0.8, 0.1, 0.7, 0.6, 0.5]
    for i, m in enumerate(metrics):
        saver = Saver(max_to_keep=1, save_top_k=2, mode="min")  # a new process for every save
        saver.save({"w": torch.zeros(1)}, str(tmp_path / "m"), global_step=i, metric=m)
    # best two (0.1 at step 3, 0.2 at step 1) and the newest (step 6)
    assert files(tmp_path) == sorted([STATE_NAME, "m_1.safetensors", "m_3.safetensors", "m_6.safetensors"])


def test_saver_pickles_and_deep_copies(tmp_path):
    import copy
    import pickle

    saver = Saver(max_to_keep=2, async_save=True)
    saver.save({"w": torch.zeros(1)}, str(tmp_path / "m"), global_step=1)
    saver.wait()
    for clone in (copy.deepcopy(saver), pickle.loads(pickle.dumps(saver))):
        clone.save({"w": torch.ones(1)}, str(tmp_path / "m"), global_step=2)
        clone.wait()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "m_2.safetensors")


def test_latest_checkpoint_of_a_missing_or_empty_directory_is_none(tmp_path):
    assert latest_checkpoint(tmp_path / "nope") is None
    assert latest_checkpoint(tmp_path) is None


def test_channels_last_and_hooked_modules_restore_exactly(tmp_path):
    src = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).to(memory_format=torch.channels_last)
    nn.init.normal_(src[0].weight)
    path = Saver().save(src, str(tmp_path / "conv"))
    dst = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).to(memory_format=torch.channels_last)
    Saver().restore(dst, path)
    assert dst[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(dst[0].weight, src[0].weight)

    # a module with a load hook goes through load_state_dict, so the hook still runs
    seen = []
    hooked = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    hooked.register_load_state_dict_post_hook(lambda module, keys: seen.append(len(keys.missing_keys)))
    Saver().restore(hooked, path)
    assert seen == [0] and torch.equal(hooked[0].weight, src[0].weight)


def test_latest_checkpoint_falls_back_to_a_scan_when_recorded_files_are_gone(tmp_path):
    saver = Saver(max_to_keep=2)
    for step in range(3):
        saver.save({"w": torch.zeros(1)}, str(tmp_path / "a"), global_step=step)
    other = Saver().save({"w": torch.zeros(1)}, str(tmp_path / "b" / "x"), global_step=9)
    os.replace(other, tmp_path / "x_9.safetensors")  # ours, but not in this directory's state file
    for name in ("a_1.safetensors", "a_2.safetensors"):
        os.remove(tmp_path / name)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "x_9.safetensors")
    assert latest_checkpoint(tmp_path, "a") is None


def test_a_training_state_file_restores_into_a_module_strict_about_the_weights(tmp_path):
    from lightning_saver.errors import StateMismatchError
    from lightning_saver.formats.state_codec import encode_state

    model = nn.Linear(3, 2)
    state = {"state_dict": model.state_dict(), "optimizer_states": [{"state": {0: {"m": torch.ones(2)}}}],
             "epoch": 3}
    encoded = encode_state(state)
    assert any(k.startswith("__state__/") for k in encoded.tensors)
    path = Saver().save(encoded.tensors, str(tmp_path / "whole"), 7, metadata=encoded.metadata)
    fresh = nn.Linear(3, 2)
    assert Saver().restore(fresh, path) == ([], [])  # the training state is not "unexpected"
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    with pytest.raises(StateMismatchError, match="missing in the checkpoint: 'extra.weight'"):
        Saver().restore(nn.ModuleDict({"extra": nn.Linear(3, 2)}), path)


def test_restore_casts_with_dtype_and_says_so_without_it(tmp_path):
    from lightning_saver.errors import StateMismatchError

    model = nn.Linear(4, 3)
    path = Saver().save(model, str(tmp_path / "fp32"), 1)
    half = nn.Linear(4, 3).to(torch.bfloat16)
    with pytest.raises(StateMismatchError, match=r"dtype mismatch for 'weight': expected BF16, found F32 "
                                                 r"\(pass dtype=torch.bfloat16 to cast\)"):
        Saver().restore(half, path)
    Saver().restore(half, path, dtype=torch.bfloat16)
    assert torch.equal(half.weight, model.weight.to(torch.bfloat16))  # what load_state_dict's copy_ gives
    peer = nn.Linear(4, 3).to(torch.bfloat16)
    peer.load_state_dict(model.state_dict())
    assert torch.equal(half.weight, peer.weight) and torch.equal(half.bias, peer.bias)
    loaded: dict = {}
    Saver().restore(loaded, path, dtype=torch.float64, map_location="cpu")
    assert loaded["weight"].dtype == torch.float64


def test_restore_materialises_a_meta_device_module(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model[1].running_mean.add_(1.5)
    path = Saver().save(model, str(tmp_path / "m"), 1)
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    Saver().restore(skeleton, path, map_location="cpu")
    assert all(not t.is_meta for t in skeleton.state_dict().values())
    assert isinstance(skeleton[0].weight, nn.Parameter) and skeleton[0].weight.requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(skeleton.state_dict()[key], value), key
    x = torch.randn(2, 4)
    assert torch.equal(skeleton.eval()(x), model.eval()(x))

"""Faults against a real S3 server: a proxy in front of moto fails or drops requests (no mocks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from s3_helpers import options_for

from lightning_saver.errors import CheckpointNotFoundError, StorageError
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint, load
from lightning_saver.saving.state_file import STATE_NAME
from lightning_saver.storage import storage_for

QUICK = {"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.05, "max_total_s": 10.0}


def _through(proxy, s3, **ours):
    """storage_options that reach the bucket through the fault proxy, with quick retries."""
    return options_for(proxy.endpoint, lightning_saver=dict(QUICK, **ours))


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_a_transient_failure_is_retried_and_the_save_succeeds(s3, fault_proxy, mode):
    options = _through(fault_proxy, s3)
    saver = CheckpointSaver(max_to_keep=2, storage_options=options)
    faults = fault_proxy.inject(method="PUT", path_contains="m_1.safetensors", fail_numbers={1}, mode=mode)
    saver.save({"w": torch.arange(10.0)}, s3.url("ck", "m"), global_step=1)
    assert faults.failed == 1
    got = load(s3.url("ck", "m_1.safetensors"), storage_options=s3.options)
    assert torch.equal(got["w"], torch.arange(10.0))


def test_a_lasting_failure_names_the_url_keeps_old_checkpoints_and_the_next_save_works(s3, fault_proxy):
    options = _through(fault_proxy, s3)
    saver = CheckpointSaver(max_to_keep=1, storage_options=options)
    saver.save({"w": torch.ones(4)}, s3.url("ck", "m"), global_step=1)
    faults = fault_proxy.inject(method="PUT", path_contains="m_2.safetensors", fail_numbers=set(range(1, 99)))
    with pytest.raises(StorageError, match=r"uploading s3://.*/ck/m_2\.safetensors failed after 3 attempts.*"
                                           r"last cause") as err:
        saver.save({"w": torch.full((4,), 2.0)}, s3.url("ck", "m"), global_step=2)
    assert faults.failed >= 3 and err.value.filename.endswith("m_2.safetensors")
    store = storage_for(s3.url("ck"), s3.options)
    assert store.listdir(s3.url("ck")) == [STATE_NAME, "m_1.safetensors"]  # nothing half-made
    assert latest_checkpoint(s3.url("ck"), storage_options=s3.options) == s3.url("ck", "m_1.safetensors")
    fault_proxy.inject()  # the network is back
    saver.save({"w": torch.full((4,), 3.0)}, s3.url("ck", "m"), global_step=3)
    assert store.listdir(s3.url("ck")) == [STATE_NAME, "m_3.safetensors"]


def test_a_failing_state_update_deletes_nothing(s3, fault_proxy):
    options = _through(fault_proxy, s3)
    saver = CheckpointSaver(max_to_keep=1, storage_options=options)
    saver.save({"w": torch.ones(4)}, s3.url("ck", "m"), global_step=1)
    fault_proxy.inject(method="PUT", path_contains=STATE_NAME, fail_numbers=set(range(1, 99)))
    with pytest.raises(StorageError, match=STATE_NAME):
        saver.save({"w": torch.ones(4)}, s3.url("ck", "m"), global_step=2)
    store = storage_for(s3.url("ck"), s3.options)
    assert "m_1.safetensors" in store.listdir(s3.url("ck"))  # rotation waits for a committed state


def test_one_tensor_reads_the_header_and_that_tensor_only(s3, fault_proxy):
    big = torch.randn(512, 1024)  # 2 MiB
    small = torch.arange(16, dtype=torch.float32)
    CheckpointSaver(storage_options=s3.options).save({"big": big, "small": small}, s3.url("m"), global_step=1)
    faults = fault_proxy.inject()
    got = load(s3.url("m_1.safetensors"), keys=["small"], storage_options=_through(fault_proxy, s3))
    assert torch.equal(got["small"], small)
    assert faults.sent < 70_000, (faults.sent, faults.requests)  # the 2 MiB tensor was not downloaded
    faults = fault_proxy.inject()
    assert torch.equal(load(s3.url("m_1.safetensors"), storage_options=_through(fault_proxy, s3))["big"], big)
    assert faults.sent > big.numel() * 4


def test_set_up_fails_early_on_a_missing_bucket_or_an_unreachable_store(s3):
    saver = CheckpointSaver(storage_options=s3.options)
    saver.check_access(s3.url("ck"))  # fine
    with pytest.raises(CheckpointNotFoundError, match="the bucket 'no-such-bucket' does not exist"):
        saver.check_access("s3://no-such-bucket/ck")
    dead = options_for("http://127.0.0.1:9", lightning_saver=QUICK)  # nothing listens on port 9
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"checking access to s3://b/ck failed after 3 attempts"):
        CheckpointSaver(storage_options=dead).check_access("s3://b/ck")
    assert time.monotonic() - start < 30


_CHILD = textwrap.dedent("""
    import sys, torch
    from lightning_saver.saving.saver import CheckpointSaver
    url, endpoint = sys.argv[1], sys.argv[2]
    sys.path.insert(0, sys.argv[3])
    from s3_helpers import options_for
    saver = CheckpointSaver(max_to_keep=2, storage_options=options_for(endpoint))
    w = torch.randn(1 << 20)  # 4 MiB per save
    for step in range(1, 10**6):
        saver.save({"w": w * step, "step": torch.tensor(step)}, url, global_step=step)
        print(step, flush=True)
""")


def test_kill_mid_upload_never_leaves_a_partial_object(s3, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    url = s3.url("ck", "m")
    rng = torch.Generator().manual_seed(0)
    for _ in range(2):  # each child pays for importing torch: keep the test short
        child = subprocess.Popen([sys.executable, str(script), url, s3.endpoint, tests_dir],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        child.stdout.readline()  # one save done: the next is under way
        time.sleep(float(torch.rand(1, generator=rng)) * 0.5)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        latest = latest_checkpoint(s3.url("ck"), verify=True, storage_options=s3.options)
        assert latest is not None
        state = load(latest, storage_options=s3.options)  # whole and checksummed
        assert torch.equal(state["w"], state["w"][:1] / state["w"][:1] * state["w"])
    names = storage_for(s3.url("ck"), s3.options).listdir(s3.url("ck"))
    assert all(n == STATE_NAME or n.endswith(".safetensors") for n in names), names


def test_incomplete_multipart_uploads_of_dead_writers_are_aborted(s3):
    fs = s3.fs()
    old = fs.call_s3("create_multipart_upload", Bucket=s3.bucket, Key="ck/m_9.safetensors")
    fs.call_s3("upload_part", Bucket=s3.bucket, Key="ck/m_9.safetensors", PartNumber=1,
               UploadId=old["UploadId"], Body=b"x" * 1024)  # what a killed upload leaves
    fs.call_s3("create_multipart_upload", Bucket=s3.bucket, Key="other/m_1.safetensors")
    store = storage_for(s3.url("ck"), s3.options)
    assert store.listdir(s3.url("ck")) == []  # invisible to readers
    # (moto reports every upload as initiated in 2010, so the age rule itself is not tested here)
    assert store.remove_incomplete(s3.url("ck"), older_than_s=0) == [s3.url("ck", "m_9.safetensors")]
    left = [u["Key"] for u in fs.list_multipart_uploads(s3.bucket)]
    assert left == ["other/m_1.safetensors"]  # another directory's upload is left alone


def test_denied_credentials_fail_at_set_up_with_a_clear_error(s3, fault_proxy):
    fault_proxy.inject(fail_numbers=set(range(1, 99)), mode="403")  # the server refuses every request
    saver = CheckpointSaver(storage_options=_through(fault_proxy, s3))
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"checking access to s3://.*/ck: access denied .*check the "
                                           r"credentials"):
        saver.check_access(s3.url("ck"))
    assert time.monotonic() - start < 10  # not retried: a permission error is not transient

"""Objects above 64 MiB on S3 are streamed into a multipart upload (no spool file): a failed part
aborts the upload, so nothing appears under the final name, and a retry produces the bytes again.
Real faults (a proxy in front of moto), real multipart uploads (16 MiB parts)."""

from __future__ import annotations

import pytest
import torch
from s3_helpers import options_for

from lightning_saver.errors import StorageError
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint, load
from lightning_saver.saving.state_file import STATE_NAME
from lightning_saver.storage import storage_for

QUICK = {"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.05, "max_total_s": 20.0}
BIG = (66 << 20) // 4  # float32 elements: 66 MiB, above the one-request limit -> 5 parts


def _uploads(s3) -> list:
    return s3.fs().call_s3("list_multipart_uploads", Bucket=s3.bucket).get("Uploads", [])


@pytest.fixture(scope="module")
def big() -> torch.Tensor:
    return torch.arange(BIG, dtype=torch.float32)


def test_a_part_failing_for_good_aborts_the_upload_and_keeps_the_previous_checkpoint(s3, fault_proxy, big):
    options = options_for(fault_proxy.endpoint, lightning_saver=QUICK)
    saver = CheckpointSaver(max_to_keep=1, storage_options=options)
    saver.save({"w": torch.ones(4)}, s3.url("ck", "m"), global_step=1)
    faults = fault_proxy.inject(method="PUT", path_contains="partNumber=2", fail_numbers=set(range(1, 99)),
                                mode="503")
    with pytest.raises(StorageError, match=r"uploading s3://.*/ck/m_2\.safetensors"):
        saver.save({"w": big}, s3.url("ck", "m"), global_step=2)
    assert faults.failed >= 2  # both of our attempts reached part 2 (each produced the bytes again)
    store = storage_for(s3.url("ck"), s3.options)
    assert store.listdir(s3.url("ck")) == [STATE_NAME, "m_1.safetensors"]  # nothing under m_2
    assert _uploads(s3) == []  # every multipart upload was aborted
    assert latest_checkpoint(s3.url("ck"), storage_options=s3.options) == s3.url("ck", "m_1.safetensors")


def test_a_transient_part_failure_is_retried_and_the_bytes_arrive_whole(s3, fault_proxy, big):
    options = options_for(fault_proxy.endpoint, lightning_saver=QUICK)
    faults = fault_proxy.inject(method="PUT", path_contains="partNumber=3", fail_numbers={1}, mode="drop")
    path = CheckpointSaver(storage_options=options).save({"w": big, "b": torch.ones(3)}, s3.url("ck", "m"),
                                                         global_step=1)
    assert faults.failed == 1
    got = load(path, storage_options=s3.options)  # checksums verified
    assert torch.equal(got["w"], big) and torch.equal(got["b"], torch.ones(3))
    assert _uploads(s3) == []

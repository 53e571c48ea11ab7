"""Bad resumes through real Trainers: each error names the file and what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from integration_helpers import STEPS_PER_EPOCH, data, model, trainer
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_saver import Saver
from lightning_saver.errors import CheckpointNotFoundError, FormatVersionError, StateMismatchError
from lightning_saver.formats.state_codec import STATE_KEY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    trainer(root, [Saver(dirpath=str(root))], max_epochs=1, limit_val_batches=0).fit(model(0), data())
    return root / f"model_{STEPS_PER_EPOCH}.safetensors"


def resume(root, path, m=None):
    t = trainer(root, [Saver(dirpath=str(root / "resumed"))], max_epochs=2, limit_val_batches=0)
    t.fit(m if m is not None else model(1), data(), ckpt_path=str(path))


def rewrite_metadata(src, dst, edit):
    """Copy a safetensors file with its header metadata changed by ``edit(metadata)``."""
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(metadata)
    save_file(tensors, str(dst), metadata=metadata)


def test_missing_ckpt_path_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "model_5.safetensors"
    with pytest.raises(CheckpointNotFoundError, match=r"nope/model_5\.safetensors.* does not exist"):
        resume(tmp_path, missing)


def test_checkpoint_of_another_model_names_the_differing_keys(tmp_path, checkpoint):
    wider = model(1, hidden=48)
    expected = (r"(?s)does not fit DigitsClassifier.*shape mismatch for 'net\.0\.weight': "
                r"the model has \[48, 64\], the checkpoint \[32, 64\]")
    with pytest.raises(StateMismatchError, match=expected):
        resume(tmp_path, checkpoint, wider)
    extra_layer = model(1)
    extra_layer.head = torch.nn.Linear(10, 2)
    with pytest.raises(StateMismatchError, match=r"missing in the checkpoint: 'head\.weight' \[2, 10\]"):
        resume(tmp_path, checkpoint, extra_layer)


def test_newer_training_state_version_is_refused(tmp_path, checkpoint):
    newer = tmp_path / "newer_state.safetensors"

    def bump(metadata):
        document = json.loads(metadata[STATE_KEY])
        document["version"] += 1
        metadata[STATE_KEY] = json.dumps(document)

    rewrite_metadata(checkpoint, newer, bump)
    with pytest.raises(FormatVersionError, match=r"newer_state\.safetensors: .*version 2 is newer.*upgrade"):
        resume(tmp_path, newer)


def test_newer_file_format_version_is_refused(tmp_path, checkpoint):
    newer = tmp_path / "newer_file.safetensors"

    def bump(metadata):
        ours = json.loads(metadata["lightning_saver"])
        ours["format_version"] += 1
        metadata["lightning_saver"] = json.dumps(ours)

    rewrite_metadata(checkpoint, newer, bump)
    with pytest.raises(FormatVersionError, match=r"newer_file\.safetensors"):
        resume(tmp_path, newer)

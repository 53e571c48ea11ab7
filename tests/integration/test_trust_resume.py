"""Issue #12, item 12: ``ckpt_path="last"`` with a corrupt newest checkpoint resumes from the newest
valid one, naming the skipped file, instead of failing (a real Trainer)."""

from __future__ import annotations

import logging

from integration_helpers import data, model, trainer

from lightning_saver import Saver


def test_last_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    kwargs = {"dirpath": str(ckpt), "max_to_keep": 2, "every_n_train_steps": 3, "save_on_train_end": False}
    trainer(tmp_path, [Saver(**kwargs)], max_steps=9).fit(model(0), data())
    newest = ckpt / "model_9.safetensors"
    raw = bytearray(newest.read_bytes())
    raw[-3] ^= 0x40  # one flipped bit in the tensor data
    newest.write_bytes(bytes(raw))
    t = trainer(tmp_path, [Saver(**kwargs)], max_steps=12)
    with caplog.at_level(logging.WARNING, logger="lightning_saver"):
        t.fit(model(1), data(), ckpt_path="last")
    assert t.ckpt_path == str(ckpt / "model_6.safetensors")
    assert "skipping corrupt checkpoint" in caplog.text and "model_9.safetensors" in caplog.text
    assert t.global_step == 12

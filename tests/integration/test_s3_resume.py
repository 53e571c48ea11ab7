"""Lightning with checkpoints on a real S3 server (moto): dirpath, ckpt_path URL and "last"."""

from __future__ import annotations

import pytest
from integration_helpers import data, model, same_weights, trainer, weights

from lightning_saver import Saver
from lightning_saver.errors import CheckpointNotFoundError
from lightning_saver.storage import storage_for


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    m = model(3)
    trainer(tmp_path_factory.mktemp("full"), max_epochs=3).fit(m, datamodule=data())
    return weights(m)


def test_fit_on_s3_and_resume_from_a_url_and_from_last_is_bit_identical(tmp_path, s3, uninterrupted):
    url = s3.url("run", "ckpts")
    saver = Saver(max_to_keep=2, dirpath=url, storage_options=s3.options)
    trainer(tmp_path / "a", [saver], max_epochs=2).fit(model(3), datamodule=data())
    store = storage_for(url, s3.options)
    names = store.listdir(url)
    assert names == ["lightning_saver_state.json", "model_18.safetensors", "model_9.safetensors"], names

    resumed = model(3)
    again = Saver(max_to_keep=2, dirpath=url, storage_options=s3.options)
    trainer(tmp_path / "b", [again], max_epochs=3).fit(resumed, datamodule=data(),
                                                       ckpt_path=store.join(url, "model_18.safetensors"))
    assert same_weights(weights(resumed), uninterrupted)

    saver_c = Saver(max_to_keep=2, dirpath=url, storage_options=s3.options)
    t = trainer(tmp_path / "c", [saver_c], max_epochs=3)
    last = model(3)
    t.fit(last, datamodule=data(), ckpt_path="last")  # model_27 from run b: nothing left to train
    assert t.ckpt_path == store.join(url, "model_27.safetensors")
    assert same_weights(weights(last), uninterrupted)


def test_a_missing_bucket_fails_at_set_up_before_training(tmp_path, s3):
    saver = Saver(dirpath="s3://no-such-bucket-here/ckpts", storage_options=s3.options)
    t = trainer(tmp_path, [saver], max_epochs=1)
    with pytest.raises(CheckpointNotFoundError, match="no-such-bucket-here"):
        t.fit(model(0), datamodule=data())
    assert t.global_step == 0


def test_lightning_cli_resumes_from_an_s3_ckpt_path(tmp_path, s3):
    import yaml
    from integration_helpers import STEPS_PER_EPOCH
    from test_cli import small_config

    from lightning_saver.integration.cli import cli_main

    config, _ = small_config(tmp_path, "run")
    doc = yaml.safe_load(open(config))
    saver = doc["trainer"]["callbacks"][0]["init_args"]
    saver.update(dirpath=s3.url("cli"), storage_options=s3.options, async_save=False)
    with open(config, "w") as f:
        yaml.safe_dump(doc, f)
    cli_main(["fit", "--config", config, "--trainer.max_epochs", "1"])
    url = s3.url("cli", f"model_{STEPS_PER_EPOCH}.safetensors")
    assert storage_for(s3.url("cli"), s3.options).exists(url)
    cli = cli_main(["fit", "--config", config, "--ckpt_path", url, "--trainer.max_epochs", "2"])
    assert cli.trainer.ckpt_path == url
    assert cli.trainer.global_step == 2 * STEPS_PER_EPOCH

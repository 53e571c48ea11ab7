"""``lightning-saver fit|validate`` (LightningCLI, in-process) on the digits config, and its resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from integration_helpers import STEPS_PER_EPOCH, same_weights, weights

from lightning_saver.integration.cli import cli_main

CONFIG = Path(__file__).parents[2] / "configs" / "digits.yaml"


def small_config(tmp_path: Path, name: str) -> tuple[str, Path]:
    """configs/digits.yaml made tiny (400 samples, 2 epochs), writing under ``tmp_path/name``."""
    config = yaml.safe_load(CONFIG.read_text())
    root = tmp_path / name
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(root), max_epochs=2, limit_val_batches=2, enable_progress_bar=False,
                   enable_model_summary=False, logger=False)
    saver = trainer["callbacks"][0]["init_args"]
    # the export at train end is the export area's to test; here it would only cost time
    saver.update(dirpath=str(root / "checkpoints"), async_save=True, export_onnx=False,
                 export_meta_graph=False)
    config["model"]["init_args"]["hidden"] = 32
    config["data"]["init_args"].update(batch_size=32, limit=400)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), root / "checkpoints"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    config, _ = small_config(tmp_path_factory.mktemp("cli"), "full")
    cli = cli_main(["fit", "--config", config, "--trainer.max_epochs", "3"])
    return weights(cli.model)


def test_cli_fit_and_resume_from_file_are_bit_identical(tmp_path, full_run):
    config, checkpoints = small_config(tmp_path, "run")
    cli = cli_main(["fit", "--config", config])
    first = checkpoints / f"model_{2 * STEPS_PER_EPOCH}.safetensors"
    assert first.exists() and cli.trainer.global_step == 2 * STEPS_PER_EPOCH
    # a wrong width on the command line: the hyper-parameters stored in the checkpoint header win
    cli = cli_main(["fit", "--config", config, "--ckpt_path", str(first), "--trainer.max_epochs", "3",
                    "--model.init_args.hidden", "48"])
    assert cli.model.hparams.hidden == 32
    assert cli.trainer.global_step == 3 * STEPS_PER_EPOCH
    assert same_weights(weights(cli.model), full_run)


def test_cli_resume_from_last_and_validate(tmp_path):
    config, checkpoints = small_config(tmp_path, "run")
    cli_main(["fit", "--config", config, "--trainer.max_epochs", "1"])
    cli = cli_main(["fit", "--config", config, "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(checkpoints / f"model_{STEPS_PER_EPOCH}.safetensors")
    assert cli.trainer.global_step == 2 * STEPS_PER_EPOCH
    latest = checkpoints / f"model_{2 * STEPS_PER_EPOCH}.safetensors"
    cli = cli_main(["validate", "--config", config, "--ckpt_path", str(latest)])
    assert 0.0 <= float(cli.trainer.callback_metrics["val_acc"]) <= 1.0


def test_console_command_routes_fit_to_lightning_cli(capsys):
    from lightning_saver.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--ckpt_path" in out and "--trainer.callbacks" in out


def test_cli_on_the_lightning_package(tmp_path):
    """The same config on ``lightning.pytorch`` (its demo classes), resumed from "last"."""
    config, checkpoints = small_config(tmp_path, "unified")
    data = yaml.safe_load(Path(config).read_text())
    data["model"]["class_path"] = "lightning_saver.demo.unified.DigitsClassifier"
    data["data"]["class_path"] = "lightning_saver.demo.unified.DigitsDataModule"
    Path(config).write_text(yaml.safe_dump(data))
    cli = cli_main(["fit", "--config", config, "--trainer.max_epochs", "1"], package="lightning.pytorch")
    assert type(cli.trainer).__module__.startswith("lightning.pytorch")
    assert cli.trainer.checkpoint_callback is cli.trainer.callbacks[-1]
    cli = cli_main(["fit", "--config", config, "--ckpt_path", "last"], package="lightning.pytorch")
    assert cli.trainer.ckpt_path == str(checkpoints / f"model_{STEPS_PER_EPOCH}.safetensors")
    assert cli.trainer.global_step == 2 * STEPS_PER_EPOCH


def test_cli_resume_never_imports_a_class_path_stored_in_the_checkpoint(tmp_path, monkeypatch):
    """A stored ``class_path`` (not Lightning's ``_class_path``) went to jsonargparse, which imported it."""
    from lightning_saver.errors import CorruptCheckpointError
    from lightning_saver.integration.checkpoint_io import SafetensorsCheckpointIO

    marker = tmp_path / "ran"
    (tmp_path / "ls_cli_evil_model.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass M: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config, _ = small_config(tmp_path, "run")
    ckpt = str(tmp_path / "crafted.safetensors")
    hparams = {"class_path": "ls_cli_evil_model.M", "init_args": {}}
    SafetensorsCheckpointIO().save_checkpoint({"hyper_parameters": hparams, "state_dict": {}}, ckpt)
    with pytest.raises(CorruptCheckpointError, match=r"hyper_parameters\.class_path 'ls_cli_evil_model\.M'"):
        cli_main(["fit", "--config", config, "--ckpt_path", ckpt])
    assert not marker.exists()

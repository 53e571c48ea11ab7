"""What a user switching from ``ModelCheckpoint`` reaches for, run with real Trainers of both packages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from integration_helpers import STEPS_PER_EPOCH, same_weights, weights

import lightning_saver
from lightning_saver import Saver, latest_checkpoint
from lightning_saver.integration import loading


def st_files(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))


# ---------------------------------------------------------------------------- both packages (item 6)


def test_saver_is_the_checkpoint_callback_of_either_trainer(tmp_path, lightning):
    saver = Saver(dirpath=str(tmp_path))
    t = lightning.trainer(tmp_path, [saver], max_epochs=1, limit_val_batches=0)
    assert t.checkpoint_callback is saver
    assert not any(isinstance(cb, lightning.pl.callbacks.ModelCheckpoint) for cb in t.callbacks)
    m = lightning.model(0)
    t.fit(m, lightning.data())
    assert st_files(tmp_path) == [f"model_{STEPS_PER_EPOCH}.safetensors"]
    resumed = lightning.trainer(tmp_path, [Saver(dirpath=str(tmp_path))], max_epochs=2, limit_val_batches=0)
    resumed.fit(lightning.model(1), lightning.data(), ckpt_path="last")
    assert resumed.global_step == 2 * STEPS_PER_EPOCH


def test_checkpoint_io_plugin_in_either_trainer(tmp_path, lightning):
    from lightning_saver import SafetensorsCheckpointIO

    t = lightning.trainer(tmp_path, plugins=[SafetensorsCheckpointIO()], limit_val_batches=0, max_steps=3,
                          max_epochs=3)
    m = lightning.model(0)
    t.fit(m, lightning.data())
    t.save_checkpoint(tmp_path / "state.safetensors")
    again = lightning.trainer(tmp_path, plugins=[SafetensorsCheckpointIO()], limit_val_batches=0, max_steps=4,
                              max_epochs=3)
    fresh = lightning.model(5)
    again.fit(fresh, lightning.data(), ckpt_path=str(tmp_path / "state.safetensors"))
    assert again.global_step == 4


def test_standalone_saver_does_not_import_lightning(tmp_path):
    code = (
        "import sys, torch\n"
        "from lightning_saver import Saver, latest_checkpoint\n"
        "s = Saver(max_to_keep=2)\n"
        f"s.save({{'x': torch.tensor(5.0)}}, {str(tmp_path / 'variable_file')!r}, 95)\n"
        f"x = {{}}; s.restore(x, latest_checkpoint({str(tmp_path)!r})); assert x['x'].item() == 5.0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------------------- load_from_checkpoint (item 1)


@pytest.fixture
def trained(tmp_path, lightning):
    saver = Saver(dirpath=str(tmp_path / "ck"))
    m = lightning.model(0, hidden=24, dropout=0.3)
    dm = lightning.data(split_seed=7)
    lightning.trainer(tmp_path, [saver], max_steps=3, limit_val_batches=0).fit(m, dm)
    return m, latest_checkpoint(str(tmp_path / "ck"))


def test_load_from_checkpoint_of_a_safetensors_file(trained, lightning):
    m, path = trained
    loaded = lightning.Classifier.load_from_checkpoint(path)
    assert loaded.hparams.hidden == 24 and loaded.hparams.dropout == 0.3
    assert same_weights(weights(loaded), weights(m))
    overridden = lightning.Classifier.load_from_checkpoint(path, map_location="cpu", dropout=0.5)
    assert overridden.hparams.dropout == 0.5 and overridden.net[2].p == 0.5
    with pytest.raises(RuntimeError, match="size mismatch"):
        lightning.Classifier.load_from_checkpoint(path, hidden=16)
    dm = lightning.DataModule.load_from_checkpoint(path)
    assert dm.split_seed == 7 and dm.batch_size == 32


def test_load_from_checkpoint_without_the_patch(trained, lightning):
    m, path = trained
    loaded = lightning_saver.load_from_checkpoint(lightning.Classifier, path, strict=True, lr=0.5)
    assert loaded.hparams.hidden == 24 and loaded.hparams.lr == 0.5
    assert same_weights(weights(loaded), weights(m))
    assert lightning_saver.load_from_checkpoint(lightning.DataModule, path).split_seed == 7
    # a fresh process that never binds a Saver: Lightning's loader stays as it is
    code = (
        f"import {lightning.package.split('.')[0]}, sys\n"
        "import lightning_saver\n"
        "from lightning_saver.demo import classifier_class\n"
        f"m = lightning_saver.load_from_checkpoint(classifier_class({lightning.package!r}), {path!r})\n"
        f"saving = sys.modules[{lightning.package + '.core.saving'!r}]\n"
        "print(m.hparams.hidden, hasattr(saving.pl_load, '_lightning_saver_pl_load'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, check=True)
    assert out.stdout.split() == ["24", "False"]


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_load_patch_is_installed_for_the_tested_version_only(package, monkeypatch):
    import importlib

    lib = importlib.import_module(package)
    assert loading.install(package) is True  # the installed version (2.6.x) is a tested one
    assert importlib.import_module(f"{package}.core.saving").pl_load._lightning_saver_pl_load
    monkeypatch.setattr(lib, "__version__", "2.7.0")
    assert loading.install(package) is False


# ------------------------------------------------------------------ ModelCheckpoint's attributes (item 3)


def test_attributes_match_model_checkpoint(tmp_path, lightning):
    peer = lightning.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "mc", monitor="val_loss", save_top_k=2,
                                                  save_last=True)
    lightning.trainer(tmp_path, [peer], max_epochs=3).fit(lightning.model(0, lr=0.3), lightning.data())
    saver = Saver(dirpath=str(tmp_path / "st"), monitor="val_loss", save_top_k=2, max_to_keep=1,
                  save_last=True)
    t = lightning.trainer(tmp_path, [saver], max_epochs=3)
    t.fit(lightning.model(0, lr=0.3), lightning.data())
    assert saver.best_model_score == pytest.approx(float(peer.best_model_score), rel=1e-6)
    assert saver.kth_value == pytest.approx(float(peer.kth_value), rel=1e-6)
    assert sorted(float(v) for v in saver.best_k_models.values()) == pytest.approx(
        sorted(float(v) for v in peer.best_k_models.values()), rel=1e-6)
    assert saver.kth_best_model_path in saver.best_k_models and saver.best_model_path in saver.best_k_models
    assert saver.current_score == pytest.approx(float(peer.current_score), rel=1e-6)
    # save_last: a link named last.safetensors to the newest file, no second copy of the bytes
    newest = tmp_path / "st" / f"model_{3 * STEPS_PER_EPOCH}.safetensors"
    assert saver.last_model_path == str(tmp_path / "st" / "last.safetensors")
    assert os.path.islink(saver.last_model_path) and os.path.samefile(saver.last_model_path, newest)
    assert os.path.basename(peer.last_model_path) == "last.ckpt"
    assert latest_checkpoint(str(tmp_path / "st")) == str(newest)
    kept = set(st_files(tmp_path / "st")) - {"last.safetensors"}
    assert kept == {os.path.basename(p) for p in saver.best_k_models} | {newest.name}


# ---------------------------------------------------------------------------- filename templates (item 4)


def test_filename_template_like_model_checkpoint_with_the_step_suffix(tmp_path, lightning):
    template = "{epoch}-{val_loss:.2f}"
    saver = Saver(dirpath=str(tmp_path), filename=template, max_to_keep=2)
    t = lightning.trainer(tmp_path, [saver], max_epochs=3)
    t.fit(lightning.model(0), lightning.data())
    peer = lightning.pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), filename=template)
    names = st_files(tmp_path)
    assert len(names) == 2  # rotation sees one series across the rendered names
    newest = latest_checkpoint(str(tmp_path))
    expected = peer.format_checkpoint_name({"epoch": torch.tensor(2), **t.callback_metrics})
    assert newest == expected[: -len(".ckpt")] + f"_{3 * STEPS_PER_EPOCH}.safetensors"
    resumed = lightning.trainer(tmp_path, [Saver(dirpath=str(tmp_path), filename=template, max_to_keep=2)],
                                max_epochs=4)
    resumed.fit(lightning.model(1), lightning.data(), ckpt_path="last")
    assert resumed.ckpt_path == newest
    assert os.path.basename(newest) in st_files(tmp_path) and len(st_files(tmp_path)) == 2


BAD_TEMPLATES = ["{0}", "{epoch!r}", "{val_loss:q}", "{a.b[0]}", "sub/{epoch}", "{epoch"]


@pytest.mark.parametrize("template", BAD_TEMPLATES)
def test_templates_we_cannot_honour_are_refused_at_construction(template):
    with pytest.raises(ValueError, match="filename"):
        Saver(filename=template)


# ---------------------------------------------------------------------------- save_on_exception (item 8)


class Interrupt:
    """Sends a real signal to this process during the training step ``at`` (mid-step)."""

    def __init__(self, at: int, signum: int) -> None:
        self.at, self.signum = at, signum

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.signum)


def _callback(lightning, at, signum):
    return type("Interrupt", (Interrupt, lightning.pl.Callback), {})(at, signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_saves_the_current_step_and_resume_continues(tmp_path, lightning, signum):
    saver = Saver(dirpath=str(tmp_path), every_n_epochs=10)
    previous = signal.getsignal(signal.SIGINT)
    try:
        t = lightning.trainer(tmp_path, [saver, _callback(lightning, 4, signum)], max_epochs=2,
                              limit_val_batches=0)
        with pytest.raises((SystemExit, BaseException)):
            t.fit(lightning.model(0), lightning.data())
    finally:
        signal.signal(signal.SIGINT, previous)  # Lightning's shutdown leaves Ctrl-C ignored
    # the step that was running when the signal came completes, then is saved
    assert st_files(tmp_path) == ["model_5.safetensors"]
    resumed = lightning.trainer(tmp_path, [Saver(dirpath=str(tmp_path), every_n_epochs=10)], max_epochs=1,
                                limit_val_batches=0)
    steps = []
    recorder = type("R", (lightning.pl.Callback,), {
        "on_train_batch_start": lambda self, tr, m, b, i: steps.append(tr.global_step)})()
    resumed.callbacks.append(recorder)
    resumed.fit(lightning.model(1), lightning.data(), ckpt_path="last")
    assert steps[0] == 5 and resumed.global_step == STEPS_PER_EPOCH


def test_save_on_exception_off_writes_nothing(tmp_path, lightning):
    saver = Saver(dirpath=str(tmp_path), every_n_epochs=10, save_on_exception=False)
    previous = signal.getsignal(signal.SIGINT)
    try:
        t = lightning.trainer(tmp_path, [saver, _callback(lightning, 4, signal.SIGINT)], max_epochs=1,
                              limit_val_batches=0)
        with pytest.raises(SystemExit):
            t.fit(lightning.model(0), lightning.data())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not os.path.exists(tmp_path) or st_files(tmp_path) == []


# ---------------------------------------------------------------------------- the demo's output (item 11)


def test_save_lines_go_through_the_progress_bar_on_their_own_line(tmp_path, lightning, capsys):
    bar = lightning.pl.callbacks.TQDMProgressBar()
    t = lightning.trainer(tmp_path, [Saver(dirpath=str(tmp_path)), bar], enable_progress_bar=True,
                          limit_val_batches=0)
    t.fit(lightning.model(0), lightning.data())
    out = capsys.readouterr().out
    lines = [line.split("\r")[-1] for line in out.split("\n") if "Saver: " in line]
    assert any(line.startswith(f"Saver: {tmp_path}") for line in lines), out[-2000:]
    assert all(line.startswith("Saver: ") for line in lines), lines

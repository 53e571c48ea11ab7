"""The async Saver callback copies parameters while the next forward/backward runs; the next
optimizer step waits for the copy, so each file holds exactly the state at its step."""

from __future__ import annotations

import os
import time

import pytest
import pytorch_lightning as pl
import safetensors.torch
import torch
from integration_helpers import trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_saver import Saver
from lightning_saver.saving.deferred_copy import DeferredCopy

OPT_PREFIX = "__state__/optimizer_states/"


class Recorder(pl.LightningModule):
    """Linear + BatchNorm (whose forward changes its buffers), Adam; records its state at every step.

    The module's ``on_train_batch_end`` runs after every callback's, so after the Saver's save and
    before anything else changes a tensor: what it records is what each file must hold.
    """

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.second = nn.Linear(32, 4)
        self.automatic_optimization = not manual
        self.recorded: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        if self.automatic_optimization:
            return loss
        opt_a, opt_b = self.optimizers()
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()
        return None

    def configure_optimizers(self):
        if self.automatic_optimization:
            return torch.optim.Adam(self.parameters(), lr=0.05)
        return [torch.optim.Adam(self.first.parameters(), lr=0.05), torch.optim.SGD(self.second.parameters(),
                                                                                     lr=0.1, momentum=0.9)]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        state = {k: v.clone() for k, v in self.state_dict().items()}
        optimizers = self.trainer.optimizers
        for i, opt in enumerate(optimizers):
            for p, s in opt.state_dict()["state"].items():
                for key, value in s.items():
                    if isinstance(value, torch.Tensor):
                        state[f"{OPT_PREFIX}{i}/state/{p}/{key}"] = value.clone()
        # with gradient accumulation the save comes at the first batch end after its step
        self.recorded.setdefault(self.trainer.global_step, state)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 16, generator=g), torch.randint(0, 4, (96,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.fixture
def slow_writer(monkeypatch):
    """The writer starts each deferred copy only after 0.3 s: the next steps come long before."""
    original = DeferredCopy.complete

    def late(copy: DeferredCopy) -> None:
        time.sleep(0.3)
        original(copy)

    monkeypatch.setattr(DeferredCopy, "complete", late)


def _check_files(directory: str, recorded: dict[int, dict[str, torch.Tensor]]) -> int:
    names = [n for n in os.listdir(directory) if n.endswith(".safetensors")]
    assert names
    for name in names:
        step = int(name.rsplit("_", 1)[1].split(".")[0])
        on_disk = safetensors.torch.load_file(os.path.join(directory, name))  # the peer's reader
        expected = recorded[step]
        assert any(k.startswith(OPT_PREFIX) for k in expected)
        for key, value in expected.items():
            assert torch.equal(on_disk[key], value), f"{name}: {key} is not the state at step {step}"
    return len(names)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_files_hold_the_state_at_their_step_with_overlapped_copies(tmp_path, slow_writer, accumulate):
    module = Recorder()
    saver = Saver(dirpath=str(tmp_path), max_to_keep=None, async_save=True, every_n_train_steps=1,
                  save_on_train_end=False)
    assert saver.overlap_copy  # the callback's default
    t = trainer(tmp_path, [saver], max_steps=4, limit_val_batches=0, accumulate_grad_batches=accumulate)
    t.fit(module, _loader())
    assert _check_files(str(tmp_path), module.recorded) == 4


def test_manual_optimization_with_two_optimizers(tmp_path, slow_writer):
    module = Recorder(manual=True)
    # under manual optimization global_step counts every optimizer's steps: 2 per batch
    saver = Saver(dirpath=str(tmp_path), max_to_keep=None, async_save=True, every_n_train_steps=2,
                  save_on_train_end=False)
    t = trainer(tmp_path, [saver], max_steps=8, limit_val_batches=0)
    t.fit(module, _loader())
    assert _check_files(str(tmp_path), module.recorded) == 4
    assert saver._step_hooks == []  # the optimizers' step pre-hooks were removed at the end


def test_overlap_copy_false_blocks_for_the_whole_copy(tmp_path, slow_writer):
    module = Recorder()
    saver = Saver(dirpath=str(tmp_path), max_to_keep=None, async_save=True, every_n_train_steps=1,
                  save_on_train_end=False, overlap_copy=False)
    t = trainer(tmp_path, [saver], max_steps=3, limit_val_batches=0)
    t.fit(module, _loader())
    assert _check_files(str(tmp_path), module.recorded) == 3

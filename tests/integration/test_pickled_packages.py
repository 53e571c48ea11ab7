"""A pickled Saver / CheckpointIO names the Lightning packages it was bound to, and unpickling imports
them: a crafted checkpoint file naming another module must be refused before anything is imported."""

from __future__ import annotations

import pickle
import sys

import pytest
import pytorch_lightning  # noqa: F401  (the package the real pickle below is bound to)
import torch

from lightning_saver import SafetensorsCheckpointIO
from lightning_saver.integration import callback, checkpoint_io, compat
from lightning_saver.integration.saver import Saver

CANARY = "lightning_saver_canary_module"


class _Crafted:
    """Pickles as what a bound class's ``__reduce_ex__`` writes, but with a package of our choosing."""

    def __init__(self, bound_for, plain) -> None:
        self.bound_for, self.plain = bound_for, plain

    def __reduce__(self):
        return (compat.rebuild, (self.bound_for, self.plain, (CANARY,)))


@pytest.mark.parametrize("bound_for, plain", [(checkpoint_io._bind_io, checkpoint_io.SafetensorsCheckpointIO),
                                              (callback._bound_for_pickle, Saver)],
                         ids=["CheckpointIO", "Saver"])
def test_a_crafted_file_naming_another_package_is_refused_before_any_import(tmp_path, monkeypatch,
                                                                            bound_for, plain):
    marker = tmp_path / "imported"
    (tmp_path / f"{CANARY}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "crafted.ckpt"
    torch.save({"hyper_parameters": {"io": _Crafted(bound_for, plain)}}, path)
    with pytest.raises(ValueError, match=f"Lightning package '{CANARY}' refused: lightning_saver binds only"):
        torch.load(path, weights_only=False)
    assert not marker.exists() and CANARY not in sys.modules


def test_a_real_pickle_still_loads():
    io = SafetensorsCheckpointIO(verify=False)
    back = pickle.loads(pickle.dumps(io))
    assert type(back)._bound_packages == type(io)._bound_packages
    assert back.verify is False


def test_module_refuses_a_name_outside_the_table():
    with pytest.raises(ValueError, match="'os' refused"):
        compat.module("os")
    with pytest.raises(ValueError, match="'json' refused"):
        compat.fabric_module("json", "decoder")

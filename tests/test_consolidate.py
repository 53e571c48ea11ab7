"""consolidate and inspect on sets, read back by ``safetensors`` and ``transformers``."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lightning_saver.cli import main
from lightning_saver.commands.consolidate import parse_size, plan_files
from lightning_saver.saving import names, sharded


def write_set(directory, state: dict[str, torch.Tensor], step: int = 3) -> str:
    return sharded.save_set(state, names.series_of(directory / "model"), step,
                            info={"global_step": step, "wall_time": 1.0})


def test_weights_only_by_default_with_optimizer_on_request(tmp_path, capsys):
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3, dtype=torch.bfloat16),
             "__state__/optimizer_states/0/state/w/exp_avg": torch.full((3, 4), 0.5)}
    path = write_set(tmp_path, state)
    assert main(["consolidate", path, str(tmp_path / "w.safetensors")]) == 0
    weights = safetensors.torch.load_file(tmp_path / "w.safetensors")
    assert sorted(weights) == ["b", "w"] and torch.equal(weights["w"], state["w"])
    assert weights["b"].dtype == torch.bfloat16
    assert main(["consolidate", str(tmp_path), str(tmp_path / "all.safetensors"), "--with-optimizer"]) == 0
    everything = safetensors.torch.load_file(tmp_path / "all.safetensors")
    assert all(torch.equal(everything[k], v) for k, v in state.items()) and len(everything) == 3
    capsys.readouterr()
    assert main(["inspect", path]) == 0
    assert "split" in capsys.readouterr().out


def test_a_missing_set_is_an_error_naming_it(tmp_path, capsys):
    missing = str(tmp_path / "nope.safetensors.index.json")
    assert main(["consolidate", missing, str(tmp_path / "o.safetensors")]) == 1
    assert "nope.safetensors.index.json" in capsys.readouterr().err


def test_sizes_and_file_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 << 20 and parse_size("10") == 10
    with pytest.raises(ValueError, match="5 parsecs"):
        parse_size("5 parsecs")
    # a tensor larger than the limit gets a file of its own; order is by name
    assert plan_files({"a": 4, "b": 4, "c": 9, "d": 1}, 8) == [["a", "b"], ["c"], ["d"]]


def test_hugging_face_layout_loads_in_transformers(tmp_path):
    import transformers  # a test dependency (pyproject test extras)

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    (tmp_path / "sets").mkdir()
    write_set(tmp_path / "sets", {k: v.clone() for k, v in model.state_dict().items()})
    out = tmp_path / "hf"
    code = main(["consolidate", str(tmp_path / "sets" / "model_3.safetensors.index.json"),
                 str(out / "model.safetensors"), "--max-shard-size", "8KB"])
    assert code == 0
    layout = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(layout["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    config.save_pretrained(out)
    loaded = transformers.BertModel.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_checkpoint_io_reads_a_set_whole(tmp_path):
    """DDP / one process (validate, test) accept a set wherever a checkpoint path goes."""
    from lightning_saver.integration.checkpoint_io import SafetensorsCheckpointIO

    state = {"net.weight": torch.randn(4, 3), "net.bias": torch.randn(4)}
    path = write_set(tmp_path, state)
    loaded = SafetensorsCheckpointIO().load_checkpoint(path)
    assert sorted(loaded["state_dict"]) == sorted(state)
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state.items())

"""The seed example: save x = 5.0 in one Python process, restore it in a brand-new one."""

import subprocess
import sys
import textwrap

import torch

from lightning_saver import Saver, latest_checkpoint


def test_save_x_then_restore_in_a_new_process(tmp_path):
    saver = Saver(max_to_keep=5)
    x = {"x": torch.tensor(5.0)}
    for step in range(95, 101):
        x["x"].fill_(5.0 if step == 100 else float(step))
        path = saver.save(x, str(tmp_path / "variable_file"), global_step=step)
    assert path == str(tmp_path / "variable_file_100.safetensors")
    kept = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert kept == [f"variable_file_{s}.safetensors" for s in (100, 96, 97, 98, 99)]

    script = textwrap.dedent(
        f"""
        import torch
        from lightning_saver import latest_checkpoint
        from lightning_saver.saving.saver import CheckpointSaver  # the Saver without Lightning: a fast import
        path = latest_checkpoint({str(tmp_path)!r})
        x = {{"x": torch.tensor(0.0)}}
        CheckpointSaver().restore(x, path)
        print(path, x["x"].item())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "variable_file_100.safetensors"), "5.0"]
    assert latest_checkpoint(tmp_path) == path

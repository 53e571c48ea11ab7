"""The main job, for now: train a small model with ``Saver(max_to_keep=5)``, then restore it elsewhere.

1. trains a small MLP on synthetic data for 100 steps, saving every 10 steps;
2. lists the kept checkpoint files (the 5 newest) and the state file;
3. restores the latest checkpoint in a NEW Python process and checks the weights match.

Run it with ``make demo`` (or ``python examples/demo.py --dir runs/demo``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import torch
from torch import nn

from lightning_saver import Saver, latest_checkpoint


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))


def fingerprint(model: nn.Module) -> dict[str, str]:
    """sha256 of every tensor's bytes, so two processes can compare weights exactly."""
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16]
            for k, v in model.state_dict().items()}


# The child process: a fresh interpreter that knows only the directory.
CHILD = """
import json, sys
sys.path.insert(0, {here!r})
from demo import fingerprint, make_model
from lightning_saver import latest_checkpoint
from lightning_saver import Saver  # no Lightning in this program: the standalone saver, no Lightning import
path = latest_checkpoint({directory!r}, verify=True)
model = make_model()
Saver().restore(model, path)
print(json.dumps({{"path": path, "weights": fingerprint(model)}}))
"""


def train(directory: str, steps: int = 100, every: int = 10) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, 256).unsqueeze(1)
    y = torch.sin(x)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    saver = Saver(max_to_keep=5)
    for step in range(1, steps + 1):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            path = saver.save(model, os.path.join(directory, "variable_file"), global_step=step)
            print(f"step {step:3d}  loss {loss.item():.4f}  saved {path}")
    return model, saver.last_checkpoints


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.path.join("runs", "demo"), help="checkpoint directory")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    start = time.perf_counter()

    model, kept = train(args.dir)
    print("\nkept checkpoints (oldest first):")
    for name in sorted(os.listdir(args.dir), key=lambda n: os.path.getmtime(os.path.join(args.dir, n))):
        print(f"  {name:32s} {os.path.getsize(os.path.join(args.dir, name)):8d} bytes")
    latest = latest_checkpoint(args.dir)
    print(f"latest_checkpoint({args.dir!r}) -> {latest}")

    here = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.run([sys.executable, "-c", CHILD.format(here=here, directory=args.dir)],
                           capture_output=True, text=True, timeout=300)
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr)
        return 1
    restored = json.loads(child.stdout.strip().splitlines()[-1])
    match = restored["weights"] == fingerprint(model) and restored["path"] == latest == kept[-1]
    print(f"\nnew process restored {restored['path']}: weights match = {match}")
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0 if match and len(kept) == 5 else 1


if __name__ == "__main__":
    sys.exit(main())

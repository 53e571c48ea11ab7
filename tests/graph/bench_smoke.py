"""Runs a benchmark script's ``main(["--quick"])`` in-process for the benchmark smoke tests."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from tf_graphs import tf_module

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_quick(script: str, capsys: Any) -> tuple[list[str], dict[str, Any]]:
    """Run ``benchmarks/<script> --quick``; return its stdout lines and its final JSON line, parsed."""
    tf_module()  # skips the test where TensorFlow is missing
    path = BENCHMARKS / script
    # as when run as a script, its folder comes first on sys.path (for benchmarks/timing.py)
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])

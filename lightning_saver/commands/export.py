"""``lightning-saver export``: a checkpoint + a model class -> ONNX and/or a TF MetaGraph.

Example::

    lightning-saver export --checkpoint ckpts/model-95.safetensors --model-class mypkg.nets.Net \\
        --init-args '{"width": 64}' --input-shape 1,3,32,32 --onnx net.onnx --meta net.meta

The checkpoint may be a lightning_saver file (weights, or a whole training state whose
``state_dict`` is used) or a TF V2 checkpoint prefix written by our own MetaGraph export
(``fc1/weight`` is loaded as ``fc1.weight``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_saver.errors import CorruptCheckpointError, LightningSaverError, StateMismatchError

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "int64": torch.int64, "int32": torch.int32}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-saver export",
        description="Export a checkpointed model to ONNX and/or a TensorFlow MetaGraph.")
    p.add_argument("--checkpoint", required=True,
                   help="lightning_saver .safetensors file or TF checkpoint prefix")
    p.add_argument("--model-class", required=True, help="import path of the nn.Module class, pkg.mod.Class")
    p.add_argument("--init-args", default="{}", help="JSON object of keyword arguments for the class")
    p.add_argument("--input-shape", action="append", default=[],
                   help="shape of one forward input, e.g. 1,3,32,32 (repeat for several inputs); "
                        "default: the model's example_input_array")
    p.add_argument("--input-dtype", action="append", default=[], choices=sorted(_DTYPES),
                   help="dtype of each input (default float32; repeat in input order)")
    p.add_argument("--onnx", help="write ONNX here")
    p.add_argument("--meta", help="write a TF MetaGraph here (+ its TF checkpoint beside it)")
    p.add_argument("--freeze", action="store_true", help="embed weights as constants in the MetaGraph")
    p.add_argument("--static-batch", action="store_true", help="keep the example batch size fixed")
    p.add_argument("--log-dir", help="also write the TF graph to a TensorBoard event file here")
    from lightning_saver.commands import _formats

    _formats.storage_options_arg(p)  # for an s3:// --checkpoint; outputs use the environment's
    return p


def _model_class(path: str) -> type[nn.Module]:
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"--model-class {path!r}: expected a dotted path like pkg.module.ClassName")
    try:
        # the user's explicit --model-class argument only; never a name read from the checkpoint
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--model-class {path!r} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"--model-class {path!r} is a {type(cls).__name__}, not an nn.Module subclass")
    return cls


def load_weights(checkpoint: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in a lightning_saver file (weights or training state) or one of our TF checkpoints
    (a local path, or an ``s3://`` URL read by ranged requests)."""
    from lightning_saver.commands import _formats
    from lightning_saver.formats import state_codec

    fmt, path = _formats.detect(checkpoint, storage_options)
    if fmt == _formats.TF:
        from lightning_saver.saving.tf_restore import load_tf

        return load_tf(path)  # names and layouts mapped back through the .meta's record
    tensors = _formats.load_all(fmt, path, options=storage_options)
    metadata = _formats.read_metadata(fmt, path, storage_options)
    if state_codec.has_state(metadata):
        state = state_codec.decode_state(tensors, metadata, source=path)
        weights = state.get("state_dict")
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise CorruptCheckpointError(f"{path}: its training state has no state_dict of tensors")
        return dict(weights)
    return tensors


def _example_inputs(model: nn.Module, shapes: list[str], dtypes: list[str]) -> tuple[Any, ...]:
    if not shapes:
        example = getattr(model, "example_input_array", None)
        if example is None:
            raise ValueError("give --input-shape (the model has no example_input_array)")
        return (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if dtypes and len(dtypes) not in (1, len(shapes)):
        raise ValueError(f"{len(dtypes)} --input-dtype for {len(shapes)} --input-shape; "
                         "give one, or one each")
    inputs = []
    for i, text in enumerate(shapes):
        try:
            shape = [int(d) for d in text.split(",")]
        except ValueError:
            raise ValueError(f"--input-shape {text!r}: expected comma-separated integers "
                             "like 1,3,32,32") from None
        dtype = _DTYPES[(dtypes[i] if len(dtypes) > 1 else dtypes[0]) if dtypes else "float32"]
        floating = dtype.is_floating_point
        inputs.append(torch.randn(shape).to(dtype) if floating else torch.zeros(shape, dtype=dtype))
    return tuple(inputs)


def main(argv: Sequence[str]) -> int:
    """Run ``export``; returns the exit code (1 with a message on stderr on failure)."""
    args = _parser().parse_args(list(argv))
    if not (args.onnx or args.meta or args.log_dir):
        print("lightning-saver export: nothing to do; give --onnx, --meta and/or --log-dir", file=sys.stderr)
        return 2
    try:
        init_args = json.loads(args.init_args)
        if not isinstance(init_args, dict):
            raise ValueError(f"--init-args must be a JSON object, got {args.init_args!r}")
        model = _model_class(args.model_class)(**init_args)
        try:
            result = model.load_state_dict(load_weights(args.checkpoint, args.storage_options), strict=False)
        except RuntimeError as err:  # shape mismatches
            raise StateMismatchError(f"{args.checkpoint} does not fit {args.model_class}: {err}; "
                                     "check --model-class and --init-args") from None
        if result.missing_keys or result.unexpected_keys:
            raise StateMismatchError(
                f"{args.checkpoint} does not fit {args.model_class}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}; check --model-class and --init-args")
        inputs = _example_inputs(model, args.input_shape, args.input_dtype)
        written = _export(model, inputs, args)
    except (LightningSaverError, OSError, ValueError, TypeError) as err:
        print(f"lightning-saver export: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def _export(model: nn.Module, inputs: tuple[Any, ...], args: argparse.Namespace) -> list[str]:
    written: list[str] = []
    dynamic = not args.static_batch
    if args.meta or args.log_dir:
        from lightning_saver.graph.tf_export import build_graph, write_meta_graph

        meta, store = build_graph(model, inputs, freeze=args.freeze, dynamic_batch=dynamic)
        if args.meta:
            written += write_meta_graph(meta, store, args.meta)
        if args.log_dir:
            from lightning_saver.graph.events import write_graph_event

            written.append(write_graph_event(meta.graph_def, args.log_dir))
    if args.onnx:
        from lightning_saver.graph.onnx_export import export_onnx

        written.append(export_onnx(model, inputs, args.onnx, dynamic_batch=dynamic))
    return written

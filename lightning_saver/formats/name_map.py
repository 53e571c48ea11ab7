"""Move weights between a TensorFlow model's variable names and a torch module's state-dict keys.

A :class:`NameMap` is a list of :class:`Rule` (TF name, torch name, layout). The layout says how the
tensor is laid out differently on the two sides:

- ``"none"``: the same on both sides.
- ``"linear"``: Dense kernel ``[in, out]`` <-> ``Linear.weight`` ``[out, in]``.
- ``"conv"``: Conv kernel ``[*spatial, in, out]`` (HWIO) <-> ``ConvNd.weight`` ``[out, in, *spatial]`` (OIHW).
- ``"conv_transpose"``: ``Conv2DTranspose`` kernel ``[*spatial, out, in]`` <-> ``ConvTransposeNd.weight``
  ``[in, out, *spatial]`` (the same permutation as ``"conv"``; both frameworks use the unflipped kernel).

A map file is JSON, ``{"dense/kernel": {"name": "fc.weight", "layout": "linear"}, "dense/bias": "fc.bias"}``.
Names without a rule pass through unchanged. :meth:`NameMap.for_module` builds the usual Keras-style
map for a torch module (``fc.weight`` <-> ``fc/kernel``, BatchNorm ``gamma``/``beta``/``moving_mean``).

Example:
    >>> nm = NameMap([Rule("dense/kernel", "fc.weight", "linear"), Rule("dense/bias", "fc.bias")])
    >>> nm.to_torch({"dense/kernel": np.zeros((784, 10), np.float32)})["fc.weight"].shape
    (10, 784)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import StateMismatchError

__all__ = ["Rule", "NameMap", "LAYOUTS"]

LAYOUTS = ("none", "linear", "conv", "conv_transpose")


@dataclass(frozen=True)
class Rule:
    """One tensor: its TensorFlow name, its torch state-dict key, and the layout change between them."""

    tf_name: str
    torch_name: str
    layout: str = "none"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"name map rule {self.tf_name!r}: unknown layout {self.layout!r}; use one of {LAYOUTS}"
            )


def _permute(value: Any, perm: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value.permute(perm).contiguous()
    return np.ascontiguousarray(np.transpose(value, perm))


def _tf_to_torch_perm(layout: str, ndim: int) -> list[int]:
    if layout == "linear":
        return [1, 0]
    spatial = list(range(ndim - 2))
    return [ndim - 1, ndim - 2, *spatial]  # [*s, a, b] -> [b, a, *s]


def _check_rank(rule: Rule, value: Any, side: str) -> None:
    ndim = len(value.shape)
    ok = ndim == 2 if rule.layout == "linear" else ndim >= 3
    if not ok:
        wanted = "2-D" if rule.layout == "linear" else "at least 3-D"
        name = rule.tf_name if side == "tf" else rule.torch_name
        raise StateMismatchError(
            f"name map: {side} tensor {name!r} has shape {tuple(value.shape)} but layout {rule.layout!r} "
            f"needs a {wanted} tensor; fix the rule's layout"
        )


def _to_torch(rule: Rule, value: Any) -> Any:
    if rule.layout == "none":
        return value
    _check_rank(rule, value, "tf")
    return _permute(value, _tf_to_torch_perm(rule.layout, len(value.shape)))


def _to_tf(rule: Rule, value: Any) -> Any:
    if rule.layout == "none":
        return value
    _check_rank(rule, value, "torch")
    perm = _tf_to_torch_perm(rule.layout, len(value.shape))
    inverse = [perm.index(i) for i in range(len(perm))]
    return _permute(value, inverse)


class NameMap:
    """Renames (and re-lays-out) tensors between TensorFlow and torch; see the module docstring."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = list(rules)
        self._by_tf = self._index([(r.tf_name, r) for r in self.rules], "TensorFlow")
        self._by_torch = self._index([(r.torch_name, r) for r in self.rules], "torch")

    @staticmethod
    def _index(pairs: list[tuple[str, Rule]], side: str) -> dict[str, Rule]:
        out: dict[str, Rule] = {}
        for name, rule in pairs:
            if name in out:
                raise ValueError(f"name map: {side} name {name!r} appears in two rules")
            out[name] = rule
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> NameMap:
        """Load a JSON map ``{tf_name: torch_name | {"name": torch_name, "layout": layout}}``.

        Raises:
            ValueError: the file is not such a JSON object (the message names the file and entry).
        """
        text = open(path, encoding="utf-8").read()
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{os.fspath(path)}: not a JSON name map: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{os.fspath(path)}: a name map is a JSON object of tf_name -> torch_name")
        rules = []
        for tf_name, spec in raw.items():
            if isinstance(spec, str):
                rules.append(Rule(tf_name, spec))
            elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
                rules.append(Rule(tf_name, spec["name"], str(spec.get("layout", "none"))))
            else:
                raise ValueError(
                    f"{os.fspath(path)}: entry {tf_name!r} must be a torch name or "
                    f'{{"name": ..., "layout": ...}}, found {spec!r}'
                )
        return cls(rules)

    def to_json(self) -> str:
        """The map as the JSON :meth:`from_file` reads."""
        body = {r.tf_name: {"name": r.torch_name, "layout": r.layout} for r in self.rules}
        return json.dumps(body, indent=2)

    @classmethod
    def for_module(cls, module: torch.nn.Module, *, prefix: str = "") -> NameMap:
        """The Keras-style map for ``module``: ``fc.weight`` <-> ``fc/kernel`` (transposed), ``fc.bias`` <->
        ``fc/bias``, conv weights HWIO <-> OIHW, BatchNorm ``gamma``, ``beta``, ``moving_mean``,
        ``moving_variance``. ``prefix`` is prepended to every TF name (e.g. ``"model/"``).
        """
        rules: list[Rule] = []
        for mod_name, mod in module.named_modules():
            scope = prefix + mod_name.replace(".", "/")
            dot = f"{mod_name}." if mod_name else ""
            if isinstance(mod, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
                layout = "linear" if isinstance(mod, torch.nn.Linear) else "conv"
                if isinstance(mod, torch.nn.modules.conv._ConvTransposeNd):
                    layout = "conv_transpose"
                rules.append(Rule(f"{scope}/kernel", f"{dot}weight", layout))
                if mod.bias is not None:
                    rules.append(Rule(f"{scope}/bias", f"{dot}bias"))
            elif isinstance(mod, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)):
                names = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                         "running_var": "moving_variance"}  # fmt: skip
                for key, tf_key in names.items():
                    if getattr(mod, key, None) is not None:
                        rules.append(Rule(f"{scope}/{tf_key}", f"{dot}{key}"))
            elif isinstance(mod, torch.nn.Embedding):
                rules.append(Rule(f"{scope}/embeddings", f"{dot}weight"))
        return cls(rules)

    def to_torch(self, tensors: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
        """TF name -> value  becomes  torch name -> value, re-laid-out; unmapped names pass through.

        Raises:
            StateMismatchError: ``strict`` and a rule's TF name is not in ``tensors``, or a layout
                does not fit the tensor's rank.
        """
        return self._apply(tensors, self._by_tf, "torch_name", _to_torch, "TensorFlow", strict)

    def to_tf(self, tensors: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
        """torch name -> value  becomes  TF name -> value; the inverse of :meth:`to_torch`."""
        return self._apply(tensors, self._by_torch, "tf_name", _to_tf, "torch", strict)

    def _apply(self, tensors: Mapping[str, Any], by_name: dict[str, Rule], target: str, convert: Any,
               side: str, strict: bool) -> dict[str, Any]:  # fmt: skip
        missing = [name for name in by_name if name not in tensors]
        if strict and missing:
            raise StateMismatchError(
                f"name map: {side} tensor {missing[0]!r} is not in the source ({len(missing)} mapped "
                f"names missing; the source has {', '.join(list(tensors)[:8])}, ...); "
                "fix the map or pass strict=False"
            )
        out: dict[str, Any] = {}
        for name, value in tensors.items():
            rule = by_name.get(name)
            new_name = getattr(rule, target) if rule else name
            if new_name in out:
                raise StateMismatchError(f"name map: two source tensors map to {new_name!r}")
            out[new_name] = convert(rule, value) if rule else value
        return out

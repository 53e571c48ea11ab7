"""``lightning-saver fit|validate|test|predict``: LightningCLI in subclass mode, safetensors-aware.

``lightning-saver fit --config configs/digits.yaml`` trains; adding ``--ckpt_path PATH`` (a
``.safetensors`` file from the ``Saver``, or ``last``) resumes. LightningCLI itself ``torch.load``s
the ``--ckpt_path`` file to read the model's hyper-parameters; for a safetensors file we read them
from its header instead, without unpickling anything.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.integration import compat
from lightning_saver.integration.checkpoint_io import is_safetensors_file, load_state


class _SaverCLIMixin:
    """LightningCLI whose ``--ckpt_path`` may be a safetensors checkpoint (or ``last``)."""

    config: Any
    parser: Any

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not (ckpt_path and Path(ckpt_path).is_file() and is_safetensors_file(ckpt_path)):
            # .ckpt files (torch.load with weights_only=True), "last", None
            super()._parse_ckpt_path()  # type: ignore[misc]
            return
        hparams: dict[str, Any] = dict(load_state(ckpt_path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        _check_class_paths(hparams, ckpt_path, "hyper_parameters")
        if "_class_path" in hparams:
            class_path = _imported_class_path(hparams.pop("_class_path"), ckpt_path)
            hparams = {"class_path": class_path, "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the hyper-parameters stored in {ckpt_path} failed!\n")
            raise


def _check_class_paths(value: Any, ckpt_path: str, where: str) -> None:
    """Every ``class_path`` inside the stored hyper-parameters, at any depth, names an imported class.

    jsonargparse imports the module of each ``class_path`` it parses (the model's own, or a nested
    subclass-typed argument's): none of those names may come from the file unchecked.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "class_path":
                _imported_class_path(item, ckpt_path, f"{where}.class_path")
            _check_class_paths(item, ckpt_path, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_class_paths(item, ckpt_path, f"{where}[{i}]")


def _imported_class_path(class_path: Any, ckpt_path: str, where: str = "hyper_parameters._class_path") -> str:
    """``class_path`` if it names a class of an already imported module: a file never makes us import."""
    module, _, name = class_path.rpartition(".") if isinstance(class_path, str) else ("", "", "")
    found = vars(sys.modules[module]).get(name) if module in sys.modules else None
    if not isinstance(found, type):
        raise CorruptCheckpointError(
            f"{ckpt_path}: {where} {str(class_path)[:200]!r} is not a class of an "
            "imported module; reading a checkpoint never imports a module it names. Give the model "
            "class in the config (model.class_path) instead"
        )
    return class_path


@functools.cache
def saver_cli_class(package: str) -> type:
    """``SaverCLI`` on ``package``'s LightningCLI."""
    return type("SaverCLI", (_SaverCLIMixin, compat.module(package, "cli").LightningCLI),
                {"__module__": __name__, "__doc__": _SaverCLIMixin.__doc__})


def cli_package() -> str:
    """The Lightning package the console command uses (see the module docs)."""
    wanted = os.environ.get("LIGHTNING_SAVER_PACKAGE", "")
    if wanted:
        return "lightning.pytorch" if wanted.startswith("lightning") else "pytorch_lightning"
    installed = compat.installed()
    return installed[0] if installed else compat.default_package()


def cli_main(argv: Sequence[str] | None = None, *, package: str | None = None) -> Any:
    """Run LightningCLI (subcommands ``fit``, ``validate``, ``test``, ``predict``) on ``argv``.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.
        package: ``"pytorch_lightning"`` or ``"lightning.pytorch"``; by default :func:`cli_package`.

    Returns:
        The CLI object (``.trainer``, ``.model``, ``.datamodule``), for callers that run it in-process.

    Example:
        >>> cli_main(["fit", "--config", "configs/digits.yaml"])  # doctest: +SKIP
    """
    args = list(sys.argv[1:] if argv is None else argv)
    # raised inside Lightning 2.6's own pytree helper (torch deprecated LeafSpec); nothing a user can fix
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
    cli = saver_cli_class(package or cli_package())
    # LightningCLI warns when both ``args`` and sys.argv are given; ours are sys.argv itself
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        return cli(args=args, save_config_kwargs={"overwrite": True})
    finally:
        sys.argv = saved

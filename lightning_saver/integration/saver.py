"""``Saver``: the standalone saver and, in a Lightning program, the checkpoint callback, in one name.

This module imports no Lightning. ``Saver(...)`` in a program that has imported ``pytorch_lightning``
and/or ``lightning`` returns an instance of the class *bound* to those packages (``compat.py``): the
same options, plus the hooks of ``callback.py`` and each package's ``Checkpoint`` base, so either
package's Trainer accepts it. Without Lightning it is a :class:`CheckpointSaver` with the
callback's options stored and unused.

The ``ModelCheckpoint`` attributes (``best_model_path``, ``best_model_score``, ``best_k_models``,
``kth_best_model_path``, ``kth_value``, ``last_model_path``, ``current_score``) are computed here
from the scores of the kept files.
"""

from __future__ import annotations

import math
import os
import string
import time
from datetime import timedelta
from typing import Any

from lightning_saver.integration import compat
from lightning_saver.saving.names import DEFAULT_EXT
from lightning_saver.saving.saver import CheckpointSaver
from lightning_saver.storage import is_url

__all__ = ["Saver", "render_filename", "check_template"]


def check_template(template: str) -> list[str]:
    """The fields of a ``filename`` template (``"{epoch}-{val_loss:.2f}"``), checked.

    Raises:
        ValueError: a field we cannot fill per save (positional, attribute or index access, a
            conversion, a nested spec, a spec that does not format a number), or a ``/``.
    """
    if "/" in template or os.sep in template:
        raise ValueError(f"Saver(filename={template!r}): the file name may not contain a directory; "
                         "put it in dirpath")
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"Saver(filename={template!r}) is not a valid template: {exc}") from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field or field.isdigit() or conversion or "{" in (spec or "") or "[" in field:
            raise ValueError(
                f"Saver(filename={template!r}): field {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not supported; use {{name}} or {{name:spec}} with a "
                "logged metric, 'epoch' or 'step'"
            )
        try:
            format(1.5, spec or "")
        except ValueError:
            raise ValueError(f"Saver(filename={template!r}): format spec {spec!r} of {{{field}}} does not "
                             "format a number") from None
        fields.append(field)
    return fields


def render_filename(template: str, metrics: dict[str, Any], *, auto_insert_metric_name: bool = True) -> str:
    """Fill a ``filename`` template as ``ModelCheckpoint.format_checkpoint_name`` does (no step).

    Fields name ``epoch``, ``step`` or any logged metric (dots allowed); a field with no value is 0.
    With ``auto_insert_metric_name`` each field is prefixed by ``name=``.

    Example:
        >>> render_filename("{epoch}-{val_loss:.2f}", {"epoch": 3, "val_loss": 0.5234})
        'epoch=3-val_loss=0.52'
    """
    out = []
    for literal, field, spec, _conversion in string.Formatter().parse(template):
        out.append(literal)
        if field is None:
            continue
        value = metrics.get(field, 0)
        value = value.item() if hasattr(value, "item") else value
        if auto_insert_metric_name:
            out.append(f"{field}=")
        out.append(format(value, spec or ""))
    return "".join(out)


def _template_of(filename: str, auto_insert: bool) -> str:
    """The prefix the rotation series is keyed by: the template with ``name=`` inserted."""
    if not auto_insert:
        return filename
    out = []
    for literal, field, spec, _conversion in string.Formatter().parse(filename):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            out.append(f"{field}={{{field}{':' + spec if spec else ''}}}")
    return "".join(out)


def _bound_saver(plain: type, packages: tuple[str, ...]) -> type:
    from lightning_saver.integration.callback import bound_saver_class

    return bound_saver_class(plain, packages)


class Saver(CheckpointSaver, metaclass=compat.BoundMeta):
    """TensorFlow ``train.Saver`` semantics on safetensors, and a drop-in for ``ModelCheckpoint``.

    Args:
        max_to_keep: keep the newest N checkpoints (``None``/``0``: all).
        keep_every_n_hours: also keep one checkpoint per N hours of wall time, forever.
        async_save: write in the background; training blocks only for a CPU snapshot.
        overlap_copy: with ``async_save``, copy the parameters and optimizer state while the next
            forward and backward run; the next optimizer step waits for the copy
            (``on_before_optimizer_step``, and a step pre-hook on every optimizer under manual
            optimization). Other tensors (buffers, loop state) are copied before the hook returns.
            ``False``: the whole copy blocks the hook, as ``CheckpointSaver.save`` does.
        verify: check checksums when restoring.
        save_top_k: also keep the best k checkpoints by ``monitor`` (``-1``: keep all).
        mode: ``"min"`` or ``"max"``, how ``monitor`` ranks checkpoints.
        dirpath: directory of the checkpoints; by default ``<logger dir or default_root_dir>/checkpoints``,
            as ``ModelCheckpoint`` does.
        filename: file prefix, or a ``ModelCheckpoint`` template such as ``"{epoch}-{val_loss:.2f}"``;
            files are ``<filename>_<global_step>.safetensors`` (the step is always the suffix).
        monitor: logged metric ranking checkpoints for ``save_top_k``.
        every_n_train_steps: save every N optimizer steps.
        every_n_epochs: save at the end of every N-th training epoch (default 1 when no other
            schedule is given).
        train_time_interval: save when this much training time passed (``timedelta`` or seconds).
        save_on_train_end: save when training ends, unless that step is already saved.
        save_last: keep ``last.safetensors`` pointing at the newest checkpoint (a symbolic link,
            a hard link or, where neither is possible, a copy).
        save_on_exception: on Ctrl-C or SIGTERM, save the current step (between optimizer steps)
            before the run stops.
        weights_only: save the module's weights alone (a plain safetensors file);
            ``save_weights_only`` is the same, by ``ModelCheckpoint``'s name.
        auto_insert_metric_name: ``{epoch}`` in ``filename`` becomes ``epoch=3``.
        verbose: also print each save through the progress bar / log at INFO (always logged).
        allow_pickle: store values with no JSON form pickled (and load them) instead of raising.
        export_onnx: at the end of training, export the module (``example_input_array``) to ONNX.
        export_meta_graph: at the end of training, export a TensorFlow MetaGraph + checkpoint.
        storage_options: fsspec options for a URL ``dirpath`` (``s3://bucket/run/ckpts``):
            ``endpoint_url``, ``key``, ``secret``... Access is checked at set-up, before training.

    Example:
        >>> trainer = L.Trainer(callbacks=[Saver(max_to_keep=5, every_n_train_steps=100)])  # doctest: +SKIP
        >>> trainer.fit(model, ckpt_path="last")  # doctest: +SKIP
    """

    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = DEFAULT_EXT

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return compat.new_instance(cls, args, kwargs, _bound_saver, compat.loaded())

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_every_n_hours: float | None = None,
        *,
        async_save: bool = False,
        overlap_copy: bool = True,
        verify: bool = True,
        save_top_k: int | None = None,
        mode: str = "min",
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "model",
        monitor: str | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: timedelta | float | None = None,
        save_on_train_end: bool = True,
        save_last: bool | str | None = None,
        save_on_exception: bool = True,
        weights_only: bool = False,
        save_weights_only: bool | None = None,
        auto_insert_metric_name: bool = True,
        verbose: bool = False,
        allow_pickle: bool = False,
        export_onnx: bool = False,
        export_meta_graph: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        CheckpointSaver.__init__(self, max_to_keep, keep_every_n_hours, async_save=async_save, verify=verify,
                                 save_top_k=save_top_k, mode=mode, storage_options=storage_options)
        if isinstance(train_time_interval, timedelta):
            train_time_interval = train_time_interval.total_seconds()
        if every_n_train_steps is None and every_n_epochs is None and train_time_interval is None:
            every_n_epochs = 1
        self.template_fields = check_template(filename)
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self._dirpath_given = dirpath is not None
        self.filename = filename
        self.auto_insert_metric_name = auto_insert_metric_name
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.every_n_train_steps = every_n_train_steps or None
        self.every_n_epochs = every_n_epochs or None
        self.train_time_interval = train_time_interval
        self.save_on_train_end = save_on_train_end
        self.save_last = save_last
        self.save_on_exception = save_on_exception
        self.weights_only = bool(weights_only or save_weights_only)
        self.verbose = verbose
        self.allow_pickle = allow_pickle
        self.export_onnx = export_onnx
        self.export_meta_graph = export_meta_graph
        self.last_saved_step: int | None = None
        self.last_model_path = ""
        self.current_score: Any = None
        self._train_seconds = 0.0  # training time at the last save, carried across resumes
        self._time_at_save = 0.0
        self._timer_start = time.monotonic()
        self._pending_rng: list[dict[str, Any]] | None = None
        self._scores: dict[str, float] = {}  # path -> monitored value of our files
        self.blocked_seconds = 0.0  # total time the training loop spent in save_trainer
        self.overlap_copy = overlap_copy
        self._step_hooks: list[Any] = []

    # ------------------------------------------------------------------ ModelCheckpoint's attributes

    @property
    def save_weights_only(self) -> bool:
        return self.weights_only

    @save_weights_only.setter
    def save_weights_only(self, value: bool) -> None:
        self.weights_only = bool(value)

    @property
    def series_prefix(self) -> str:
        """The rotation series' prefix: ``filename``, with ``name=`` inserted into a template's fields."""
        if not self.template_fields:
            return self.filename
        return _template_of(self.filename, self.auto_insert_metric_name)

    def _kept_scores(self) -> list[tuple[str, float]]:
        """(path, score) of the kept files with a monitored value, best first (newest first among ties)."""
        scored = [(p, m) for p, m in self._scores.items()
                  if (is_url(p) or os.path.exists(p)) and not math.isnan(m)]
        scored.reverse()
        scored.sort(key=lambda pm: pm[1], reverse=self.mode == "max")
        return scored

    @property
    def best_k_models(self) -> dict[str, Any]:
        """Path -> score (a tensor, as ``ModelCheckpoint``) of the best ``save_top_k`` kept files."""
        import torch

        scored = self._kept_scores()
        k = self.save_top_k if self.save_top_k and self.save_top_k > 0 else len(scored)
        return {p: torch.tensor(m) for p, m in scored[:k]}

    @property
    def best_model_path(self) -> str:
        """The best kept checkpoint by ``monitor`` (the newest without one); ``ckpt_path="best"`` uses it."""
        scored = self._kept_scores()
        if scored:
            return scored[0][0]
        return self.last_checkpoints[-1] if self.last_checkpoints else ""

    @property
    def best_model_score(self) -> Any:
        """The score of ``best_model_path`` (a tensor), or None without ``monitor``."""
        best = self.best_k_models
        return best.get(self.best_model_path)

    @property
    def kth_best_model_path(self) -> str:
        """The worst of ``best_k_models`` (the next to go), ``""`` if none."""
        best = list(self.best_k_models)
        return best[-1] if best else ""

    @property
    def kth_value(self) -> Any:
        """The score of ``kth_best_model_path`` (a tensor), or None."""
        return self.best_k_models.get(self.kth_best_model_path)

    def format_checkpoint_name(self, metrics: dict[str, Any], step: int) -> str:
        """The path a save with these metrics at ``step`` writes (``dirpath`` must be known).

        Example:
            >>> Saver(dirpath="ck", filename="{epoch}").format_checkpoint_name({"epoch": 2}, 40)
            'ck/epoch=2_40.safetensors'
        """
        prefix = render_filename(self.filename, metrics, auto_insert_metric_name=self.auto_insert_metric_name)
        return os.path.join(self.dirpath or "", f"{prefix}_{step}{self.FILE_EXTENSION}")

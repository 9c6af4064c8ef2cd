"""A run's metrics as it trains: `WORKDIR/metrics.jsonl`, and TensorBoard event files.

Each line of `metrics.jsonl` is one JSON object:

- a training step: `{"kind": "train", "phase", "step" (steps of the phase done), "global_step"
  (steps of the run done), "loss", "accuracy", the method's terms (`ce`, `kd`, ...), "lr", "grad_norm"}`, and
  `"examples_per_second"` on the last step of each call of the train epoch;
- an epoch's end: `{"kind": "epoch", "phase", "epoch" (epochs of the phase done), "step",
  "global_step", ...}` with the epoch's mean of every train value (the last epoch's `loss` is
  results.json's `final_loss` of the phase);
- a phase's evaluation: `{"kind": "eval", "phase", "global_step", ...}` with the phase's record of
  results.json (accuracies, old/new, the accuracy-matrix row, timings), and `per_class_accuracy`
  and `confusion` (counts by true class, rows, and prediction, columns, over the seen classes in
  the protocol's class order) when the run gives its confusion matrix.

The values come back from the device once per call of the jitted epoch, as they already do for the
progress bar, so writing them costs the training nothing. With `log.tensorboard` the same values
go to `WORKDIR/tensorboard/` as scalars (`train/loss`, `eval/accuracy`, ...) and the confusion
matrix as an image (`eval/confusion`, each row scaled by its class's count) through tensorboardX,
which needs neither TensorFlow nor torch, and with `log.wandb=PROJECT` to Weights & Biases (the
optional `wandb` package; its own settings apply, `WANDB_MODE=offline` included; the run's id is
derived from the work directory, so a resumed run continues the same W&B run). A resumed run first drops what the killed process wrote
past the checkpoint it resumes from (the lines of later steps; TensorBoard's `purge_step`), so every
step appears once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import numpy as np

from incremental import evaluate

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_KEYS = ("accuracy", "old_accuracy", "new_accuracy", "task_aware_accuracy", "final_loss")


class MetricsLog:
    """Writes one run's metrics; `resume(phase, step)` before a phase's first step."""

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        wandb: str = "",
        config: dict | None = None,
        enabled: bool = True,
    ):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR) if tensorboard else None
        self.enabled = enabled
        self.phase_start = 0  # global step at the start of the current phase
        self._writer = None
        self._file = None  # metrics.jsonl, open for appending from the first `resume` on
        self._wandb = _wandb_run(wandb, workdir, config) if wandb and enabled else None

    def resume(self, phase: int, step: int) -> None:
        """Keeps the lines before step `step` of `phase` (and earlier phases'), drops the rest."""
        if not self.enabled:
            return
        kept = [line for line in _read(self.path) if _before(line, phase, step)]
        earlier = [line["global_step"] for line in kept if line["phase"] < phase]
        self.phase_start = max(earlier, default=0)
        if self._file is not None:
            self._file.close()
        _write(self.path, kept)
        self._file = open(self.path, "a")  # noqa: SIM115 -- open for the run, closed by `close`
        if self.tensorboard_dir is not None and self._writer is None:  # a process's first phase
            self._writer = _summary_writer(self.tensorboard_dir, self.phase_start + step + 1)

    def train(self, phase: int, first_step: int, values: dict[str, list[float]], rate: float):
        """The steps `first_step + 1, ...` of `phase`, `values[key][i]` for each (one call)."""
        if not self.enabled or not values:
            return
        count = len(next(iter(values.values())))
        lines = []
        for i in range(count):
            step = first_step + i + 1
            line = {"kind": "train", "phase": phase, "step": step}
            line["global_step"] = self.phase_start + step
            line.update({k: v[i] for k, v in values.items()})
            lines.append(line)
        lines[-1]["examples_per_second"] = rate
        self._append(lines)
        for line in lines:
            values = {k: v for k, v in line.items() if k not in ("kind", "phase", "step")}
            self._scalars("train", values, values.pop("global_step"))

    def epoch(self, phase: int, epoch: int, step: int, means: dict[str, float]) -> None:
        """The means of an epoch that ended at step `step` of `phase`."""
        if not self.enabled:
            return
        global_step = self.phase_start + step
        line = {"kind": "epoch", "phase": phase, "epoch": epoch, "step": step}
        self._append([{**line, "global_step": global_step, **means}])
        self._scalars("epoch", means, global_step)

    def evaluation(self, rec: dict, confusion: np.ndarray | None = None) -> None:
        """A phase's record (results.json's `phases` entry), after its evaluation, and the
        confusion matrix of the evaluation if there is one."""
        if not self.enabled:
            return
        global_step = max(self.phase_start, self._last_global_step())
        line = {"kind": "eval", "phase": rec["phase"], "global_step": global_step, **rec}
        if confusion is not None:
            line["per_class_accuracy"] = evaluate.per_class_accuracy(confusion)
            line["confusion"] = confusion.tolist()
        self._append([line])
        self._scalars("eval", {k: rec.get(k) for k in EVAL_KEYS}, global_step)
        if confusion is not None:
            self._image("eval/confusion", confusion_image(confusion), global_step)
        self.phase_start = global_step

    def close(self) -> None:
        self._close_writer()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _append(self, lines: list[dict]) -> None:
        if self._file is None:  # an evaluation before any phase trained (resume was not called)
            self._file = open(self.path, "a")  # noqa: SIM115 -- closed by `close`
        self._file.writelines(json.dumps(line, default=_plain) + "\n" for line in lines)
        self._file.flush()  # complete lines on disk after every call: a kill loses none
        self._last = lines[-1]["global_step"]

    def _last_global_step(self) -> int:
        return getattr(self, "_last", self.phase_start)

    def _scalars(self, group: str, values: dict[str, Any], step: int) -> None:
        """`values`' numbers as `group/KEY` at `step`: one TensorBoard event, one W&B call."""
        found = {f"{group}/{k}": float(v) for k, v in values.items() if isinstance(v, int | float)}
        if not found:
            return
        if self._writer is not None:
            from tensorboardX.proto.summary_pb2 import Summary

            summary = Summary(
                value=[Summary.Value(tag=k, simple_value=v) for k, v in found.items()]
            )
            self._writer.file_writer.add_summary(summary, step)
        if self._wandb is not None:
            self._wandb.log(found, step=step)

    def _image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 image as `tag` at `step`."""
        if self._writer is not None:
            from tensorboardX import summary

            self._writer.file_writer.add_summary(summary.image(tag, image, dataformats="HWC"), step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image)}, step=step)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _before(line: dict, phase: int, step: int) -> bool:
    """Whether `line` was written before step `step` of `phase` began (and so stays)."""
    if line["phase"] != phase:
        return line["phase"] < phase
    return line["kind"] in ("train", "epoch") and line["step"] <= step


def _read(path: str) -> list[dict]:
    """The file's complete lines (a line cut short by a kill is dropped)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    lines = []
    for raw in text.splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return lines


def _write(path: str, lines: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    os.replace(tmp, path)


def _summary_writer(directory: str, purge_step: int):
    """A tensorboardX writer that hides the events a killed process wrote from `purge_step` on."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ValueError(
            "log.tensorboard=True needs tensorboardX (pip install tensorboardX); or set "
            "--config.log.tensorboard=False (metrics.jsonl is written either way)."
        ) from None
    # One file per writer: tensorboardX names files by the second, which a resume can share.
    suffix = f".{time.time_ns()}.{os.getpid()}"  # sorted by time, as TensorBoard reads them
    return SummaryWriter(directory, purge_step=purge_step, flush_secs=30, filename_suffix=suffix)


def _wandb_run(project: str, workdir: str, config: dict | None):
    """A W&B run for `workdir` in `project`, resumed when it exists (its id: the directory's)."""
    try:
        import wandb
    except ImportError:
        raise ValueError(
            f"log.wandb={project!r} needs the wandb package (pip install -e '.[wandb]'); or leave "
            "log.wandb empty (metrics.jsonl and TensorBoard files are written either way)."
        ) from None
    key = hashlib.blake2b(os.path.abspath(workdir).encode(), digest_size=8).hexdigest()
    name = os.path.basename(os.path.abspath(workdir))
    return wandb.init(
        project=project, id=key, name=name, dir=workdir, config=config, resume="allow"
    )


def confusion_image(counts: np.ndarray, min_size: int = 256) -> np.ndarray:
    """A confusion matrix as an (H, W, 3) uint8 image: each row (a true class) divided by its count,
    coloured by matplotlib's viridis, every cell a square of pixels so the image is at least
    `min_size` wide."""
    from matplotlib import colormaps

    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    cell = max(1, -(-min_size // len(counts)))
    rgb = np.round(colormaps["viridis"](rates)[..., :3] * 255).astype(np.uint8)
    return rgb.repeat(cell, axis=0).repeat(cell, axis=1)


def _plain(value):
    """JSON for numpy scalars and arrays in a record."""
    return value.tolist() if hasattr(value, "tolist") else str(value)

"""What a person sees: progress bars, the per-phase table, the end-of-run summary and the plot."""

from __future__ import annotations

import os

import numpy as np
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

from incremental.protocol import Protocol

console = Console(highlight=False)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}"


class Progress:
    """Progress bars over phases and epochs, and one printed line per finished phase.

    With `enabled=False` it is silent (sweeps and tests).
    """

    def __init__(self, protocol: Protocol, *, enabled: bool = True, start: int = 0):
        self.protocol = protocol
        self.enabled = enabled
        self.start = start
        self.bars = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )
        self._epoch_task = None

    def __enter__(self):
        self.bars.__enter__()
        self._phase_task = self.bars.add_task(
            "phases", total=self.protocol.num_phases, completed=self.start, info=""
        )
        if not self.enabled:
            return self
        if self.start:
            console.print(f"Resuming after phase {self.start - 1} from the work directory.")
        console.print(
            f"{'phase':>5} {'classes':>7} {'acc':>6} {'old':>6} {'new':>6} {'task-aware':>10} "
            f"{'loss':>7} {'train s':>8}"
        )
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def start_steps(self, phase: int, epochs: int, per_epoch: int, done: int = 0) -> None:
        """A bar over the phase's steps (from `done`), with its epoch, loss and speed."""
        if self._epoch_task is not None:
            self.bars.remove_task(self._epoch_task)
        self._epochs, self._per_epoch = epochs, per_epoch
        self._epoch_task = self.bars.add_task(
            f"phase {phase} steps", total=epochs * per_epoch, completed=done, info=""
        )

    def steps_done(self, step: int, values: dict, examples_per_second: float) -> None:
        """After a call of the train epoch: the phase's steps so far and the call's mean loss."""
        loss = sum(values.get("loss", [0.0])) / max(len(values.get("loss", [])), 1)
        epoch = min(step // self._per_epoch + 1, self._epochs)
        info = f"epoch {epoch}/{self._epochs} loss {loss:.3f} {examples_per_second:,.0f} ex/s"
        self.bars.update(self._epoch_task, completed=step, info=info)

    def phase_done(self, record: dict) -> None:
        self.bars.update(self._phase_task, advance=1)
        if not self.enabled:
            return
        console.print(
            f"{record['phase']:>5} {record['num_seen']:>7} {_pct(record['accuracy']):>6} "
            f"{_pct(record['old_accuracy']):>6} {_pct(record['new_accuracy']):>6} "
            f"{_pct(record['task_aware_accuracy']):>10} {record['final_loss'] or 0:>7.3f} "
            f"{record['train_seconds']:>8.1f}"
        )


def summary_table(results: dict) -> Table:
    """The accuracy matrix (rows: after phase i; columns: phase j's classes) and headline metrics."""
    n = results["num_phases"]
    table = Table(
        title=f"{results['method']} on {results['dataset']}: accuracy (%) after each phase",
        box=box.SIMPLE,
    )
    table.add_column("after")
    for j in range(n):
        table.add_column(f"p{j}", justify="right")
    table.add_column("all seen", justify="right")
    for i, row in enumerate(results["accuracy_matrix"]):
        cells = [_pct(v) for v in row] + [""] * (n - len(row))
        table.add_row(f"phase {i}", *cells, _pct(results["accuracy"][i]))
    return table


def print_summary(results: dict, workdir: str) -> None:
    if "per_seed" in results:
        print_seeds(results, workdir)
        return
    console.print(summary_table(results))
    seconds = sum(p["train_seconds"] + p["eval_seconds"] for p in results["phases"])
    console.print(
        f"last accuracy {_pct(results['last_accuracy'])}% | average incremental accuracy "
        f"{_pct(results['average_incremental_accuracy'])}% | forgetting "
        f"{_pct(results['forgetting'])} | backward transfer {_pct(results['backward_transfer'])}",
        soft_wrap=True,
    )
    for key in results:
        if key.endswith("_last_accuracy"):  # a method's extra classifier, e.g. nme
            name = key.removesuffix("_last_accuracy")
            console.print(
                f"{name}: last accuracy {_pct(results[key])}% | average incremental accuracy "
                f"{_pct(results[f'{name}_average_incremental_accuracy'])}%",
                soft_wrap=True,
            )
    plot_path = os.path.join(workdir, "accuracy.png")
    plot_note = f" | plot: {plot_path}" if os.path.exists(plot_path) else ""
    console.print(
        f"{seconds:.1f} s in phases | results: {workdir}/results.json{plot_note}", soft_wrap=True
    )


def phase_label(results: dict, phase: int, most: int = 3) -> str:
    """The legend's label of a phase: its class names where the data names them (up to `most`),
    "phase 1: cat, dog", else "phase 1 classes"."""
    names = results.get("class_names")
    if names is None:
        return f"phase {phase} classes"
    start = int(np.sum(results["phase_sizes"][:phase]))
    ids = results["class_order"][start : start + results["phase_sizes"][phase]]
    shown = ", ".join(names[i] for i in ids[:most])
    return f"phase {phase}: {shown}{', ...' if len(ids) > most else ''}"


def phase_lines(results: dict) -> tuple[np.ndarray, list[tuple[str, np.ndarray, list]]]:
    """The x of every phase (classes seen, or the phase where a phase brings none), and the lines of
    `plot`: for each phase, its label, x and accuracy from the phase it was learned in on.

    A phase of known classes (`incremental learn`) has no line of its own; in the domain scenario,
    where every phase after the first brings no classes, each domain has one.
    """
    seen = np.cumsum(results["phase_sizes"])[: len(results["accuracy"])]
    # A phase of no new classes (`incremental learn`, a domain) would share its x with the one before.
    if 0 in results["phase_sizes"]:
        seen = np.arange(len(results["accuracy"]))
    domains = results.get("scenario") == "domain"
    lines = []
    for j in range(len(results["accuracy"])):
        if not (results["phase_sizes"][j] or domains):  # learned known classes: no line of its own
            continue
        label = f"domain {j}" if domains else phase_label(results, j)
        values = [row[j] for row in results["accuracy_matrix"][j:]]
        lines.append((label, seen[j : j + len(values)], values))
    return seen, lines


def plot(results: dict, path: str) -> None:
    """Accuracy on all seen classes per phase, and each phase's classes over time (PNG)."""
    import matplotlib  # imported here: the command line starts faster without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    seen, lines = phase_lines(results)
    ax.plot(seen, results["accuracy"], "o-", color="black", lw=2, label="all seen classes")
    ax.plot(seen, results["task_aware_accuracy"], "s--", color="gray", label="task-aware")
    for label, x, values in lines:
        ax.plot(x, values, ".-", alpha=0.5, label=label)
    by_phase = 0 in results["phase_sizes"]
    ax.set_xlabel("phase" if by_phase else "number of classes seen")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{results['method']} on {results['dataset']}")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_seeds(results: dict, workdir: str) -> None:
    """Each seed's last and average incremental accuracy, and their mean and std over seeds."""
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("seed", "last", "avg incremental", "forgetting"):
        table.add_column(column, justify="right")
    for seed, r in results["per_seed"].items():
        table.add_row(
            seed,
            _pct(r["last_accuracy"]),
            _pct(r["average_incremental_accuracy"]),
            _pct(r["forgetting"]),
        )
    console.print(table)
    mean = lambda key: f"{_pct(results[key + '_mean'])} ± {_pct(results[key + '_std'])}"  # noqa: E731
    console.print(
        f"last accuracy {mean('last_accuracy')}% | average incremental accuracy "
        f"{mean('average_incremental_accuracy')}% over seeds {results['seeds']} | results: "
        f"{workdir}/results.json (each seed: {workdir}/seed_<s>/results.json)",
        soft_wrap=True,
    )

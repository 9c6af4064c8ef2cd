"""The comparison report: every finished run under some directories, one table and one figure.

    incremental report runs/grid [more dirs...] [--out=PREFIX]

Runs (their results.json, complete) are grouped by dataset and protocol (the phase sizes; runs
evaluated on a validation split, `dataset.validation`, apart from those on the test set), then by
method and every other config key that differs between one method's runs (`train.lr`, say) but the
seed:
each group's numbers are the mean ± std over its runs (seeds). The table (Markdown, printed and
written to PREFIX.md, and PREFIX.csv) holds the last and average incremental accuracy, forgetting,
the same for the nearest-mean classifier where the method has one, and the seconds of training and
of compiling summed over phases; the figure (PREFIX-<dataset>-<protocol>.png) draws each group's
accuracy after every phase, one line per group with its std shaded.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

IGNORED = ("seed", "log.", "checkpoint.", "compile_cache", "parallel.", "seeds")
COLUMNS = (
    ("last", "last_accuracy", 100),
    ("average", "average_incremental_accuracy", 100),
    ("forgetting", "forgetting", 100),
    ("NME last", "nme_last_accuracy", 100),
    ("NME average", "nme_average_incremental_accuracy", 100),
)


def find(directories: Sequence[str]) -> list[dict]:
    """The complete results.json documents under `directories` (each with its `workdir`)."""
    found = []
    for top in directories:
        if not os.path.isdir(top):
            raise ValueError(f"{top} is not a directory; give the directories holding runs.")
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tensorboard"))
            if "results.json" in files:
                try:
                    with open(os.path.join(root, "results.json")) as f:
                        doc = json.load(f)
                except (OSError, ValueError):
                    continue
                if doc.get("complete") and "per_seed" not in doc:  # a seeds run: its seed_<s>/
                    found.append({**doc, "workdir": root})
    if not found:
        raise ValueError(
            f"No finished run (a complete results.json) under {', '.join(directories)}."
        )
    return found


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def swept_keys(runs: Sequence[dict]) -> list[str]:
    """The config keys (but the seed and bookkeeping) whose values differ between `runs` (of one
    method: what differs between methods by their own defaults, e.g. memo's layers, is no sweep)."""
    configs = [flat(r["config"]) for r in runs]
    keys = sorted(set().union(*configs))
    keys = [k for k in keys if not k.startswith(IGNORED) and k != "method"]
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def groups(runs: Sequence[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """{(dataset, phase sizes): {label: runs}}, the label "method key=value ..." of the keys that
    differ between that method's runs on that protocol."""
    by_protocol: dict[tuple, dict[str, list[dict]]] = {}
    for run in runs:
        dataset = run["dataset"] + (
            " (validation)" if run.get("evaluated_on") == "validation" else ""
        )
        protocol = (dataset, "+".join(str(s) for s in run["phase_sizes"]))
        by_protocol.setdefault(protocol, {}).setdefault(run["method"], []).append(run)
    out: dict[tuple, dict[str, list[dict]]] = {}
    for protocol, methods in by_protocol.items():
        for method, mine in methods.items():
            keys = swept_keys(mine)
            for run in mine:
                config = flat(run["config"])
                label = " ".join([method, *(f"{k}={config.get(k)}" for k in keys)])
                out.setdefault(protocol, {}).setdefault(label, []).append(run)
    return out


def summary(runs: Sequence[dict]) -> dict:
    """Mean and std (over the runs) of each column, and the seconds, for one group."""
    row = {"runs": len(runs), "seeds": sorted({r["config"].get("seed") for r in runs})}
    for name, key, scale in COLUMNS:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[name] = _mean_std(values, scale) if values else None
    for name, key in (("train s", "train_seconds"), ("compile s", "compile_seconds")):
        values = [sum(p.get(key) or 0.0 for p in r["phases"]) for r in runs]
        row[name] = _mean_std(values, 1)
    row["curve"] = _mean_std([r["accuracy"] for r in runs], 100)
    return row


def _mean_std(values: Iterable, scale: float) -> tuple:
    array = scale * np.asarray(list(values), np.float64)
    return array.mean(axis=0), array.std(axis=0)


def table(grouped: dict) -> list[dict]:
    """One row per group: protocol, label and the summary."""
    return [
        {"dataset": dataset, "phases": sizes, "group": label, **summary(runs)}
        for (dataset, sizes), labels in sorted(grouped.items())
        for label, runs in sorted(labels.items())
    ]


def _cell(value) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.1f} ± {std:.1f}"


HEADER = ("dataset", "phases", "group", "runs", *(c[0] for c in COLUMNS), "train s", "compile s")


def markdown(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        cells = [row["dataset"], row["phases"], row["group"], str(row["runs"])]
        cells += [_cell(row[name]) for name in HEADER[4:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*HEADER[:4], *(f"{n} {s}" for n in HEADER[4:] for s in ("mean", "std"))])
        for row in rows:
            values = [row["dataset"], row["phases"], row["group"], row["runs"]]
            for name in HEADER[4:]:
                values += ["", ""] if row[name] is None else [f"{v:.4f}" for v in row[name]]
            out.writerow(values)


def figures(rows: Sequence[dict], prefix: str) -> list[str]:
    """One PNG per protocol: each group's accuracy after every phase, its std shaded."""
    import matplotlib  # imported here: only the figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset, sizes in sorted({(r["dataset"], r["phases"]) for r in rows}):
        fig, ax = plt.subplots(figsize=(8.0, 4.4), dpi=130)
        seen = np.cumsum([int(s) for s in sizes.split("+")])
        mine = [r for r in rows if (r["dataset"], r["phases"]) == (dataset, sizes)]
        colors = plt.get_cmap("tab20" if len(mine) > 10 else "tab10")
        for i, row in enumerate(sorted(mine, key=lambda r: -r["curve"][0][-1])):  # best first
            mean, std = row["curve"]
            style = dict(color=colors(i % colors.N), ls=("-", "--", ":")[i // colors.N % 3])
            ax.plot(seen, mean, marker="o", lw=1.6, ms=3, label=row["group"], **style)
            ax.fill_between(seen, mean - std, mean + std, alpha=0.15, color=style["color"])
        ax.set_xlabel("number of classes seen")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{dataset}, phases {sizes}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        name = "".join(c if c.isalnum() or c in "-." else "_" for c in f"{dataset}-{sizes}")
        paths.append(f"{prefix}-{name}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def report(directories: Sequence[str], prefix: str | None = None) -> tuple[str, list[str]]:
    """The Markdown table of the runs under `directories`; with `prefix`, also writes
    PREFIX.md, PREFIX.csv and the figures. Returns the table and the files written."""
    rows = table(groups(find(directories)))
    text = markdown(rows)
    if prefix is None:
        return text, []
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(f"{prefix}.md", "w") as f:
        f.write(text + "\n")
    write_csv(rows, f"{prefix}.csv")
    return text, [f"{prefix}.md", f"{prefix}.csv", *figures(rows, prefix)]


def main(argv: list[str], say=print) -> int:
    """`incremental report DIR... [--out=PREFIX]`: prints the table, writes the files."""
    import argparse

    parser = argparse.ArgumentParser(prog="incremental report", description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", help="directories holding finished runs")
    parser.add_argument("--out", default=None, help="write PREFIX.md, PREFIX.csv, PREFIX-*.png")
    args = parser.parse_args(argv)
    text, written = report(args.directories, args.out)
    say(text, markup=False, soft_wrap=True)
    for path in written:
        say(f"wrote {path}", markup=False)
    return 0

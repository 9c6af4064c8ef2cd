"""Compare methods over seeds on the offline datasets and write a markdown table.

    python experiments/compare.py --methods=finetune,joint,replay,icarl --datasets=digits \\
        --seeds=0,1,2 --out=experiments/rehearsal.md --title="Rehearsal methods on digits"

Each run uses the dataset's config (configs/<dataset>.py) with the method's defaults; class order
from seed 1993; `config.seed` (initialisation and batch order) varies. Accuracies in %.
"""

import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import digits, mnist1d  # noqa: E402
from incremental import run as run_lib  # noqa: E402

DATASETS = {"digits": digits.get_config, "mnist1d": mnist1d.get_config}


def define_flags() -> None:
    flags.DEFINE_list("methods", ["finetune", "joint"], "Methods to compare.")
    flags.DEFINE_list("datasets", ["digits"], "Datasets (configs) to run them on.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
    flags.DEFINE_string("out", None, "Markdown file to write.")
    flags.DEFINE_string("title", "Comparison", "Title of the table.")
    flags.DEFINE_string("note", "", "A paragraph written under the table.")


def one_run(get_config, method: str, seed: int) -> dict:
    """One complete run in a temporary work directory; adds `wall_seconds`."""
    config = get_config(f"method={method}")
    config.seed = seed
    config.log.progress = config.log.plot = False
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        try:
            results = run_lib.run(config, workdir)
        except FloatingPointError as error:  # reported in the table, not hidden
            print(f"{method} seed {seed} diverged: {error}", flush=True)
            return {"diverged": True, "wall_seconds": time.perf_counter() - start}
        results["wall_seconds"] = time.perf_counter() - start
    return results


def cell(values, scale: float = 100.0) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    values = np.asarray(values, dtype=float) * scale
    return f"{values.mean():.1f} ± {values.std():.1f}"


def table(rows: list[tuple[str, str, list[dict]]]) -> list[str]:
    """Markdown rows: last and average incremental accuracy (linear, and NME where reported)."""
    lines = [
        "| dataset | method | last acc | avg incremental acc | forgetting | NME last acc "
        "| NME avg incremental acc | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset, method, all_runs in rows:
        runs = [r for r in all_runs if not r.get("diverged")]
        if len(runs) < len(all_runs):
            method += f" ({len(all_runs) - len(runs)} of {len(all_runs)} seeds diverged)"
        if not runs:
            lines.append(f"| {dataset} | {method} |" + " – |" * 6)
            continue
        lines.append(
            f"| {dataset} | {method} | {cell([r['last_accuracy'] for r in runs])} "
            f"| {cell([r['average_incremental_accuracy'] for r in runs])} "
            f"| {cell([r['forgetting'] for r in runs])} "
            f"| {cell([r.get('nme_last_accuracy') for r in runs])} "
            f"| {cell([r.get('nme_average_incremental_accuracy') for r in runs])} "
            f"| {cell([r['wall_seconds'] for r in runs], 1.0)} |"
        )
    return lines


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    seeds = [int(s) for s in f.seeds]
    rows = []
    for dataset in f.datasets:
        for method in f.methods:
            runs = [one_run(DATASETS[dataset], method, seed) for seed in seeds]
            print(dataset, method, [r.get("last_accuracy") for r in runs], flush=True)
            rows.append((dataset, method, runs))
    lines = [
        f"# {f.title}",
        "",
        f"`python experiments/compare.py --methods={','.join(f.methods)} "
        f"--datasets={','.join(f.datasets)} --seeds={','.join(f.seeds)}` — 5 phases of 2 classes, "
        f"class order from seed 1993, mean ± std over training seeds {seeds}; accuracies in %, "
        "class-incremental (one head, no task label); NME only for methods with exemplars. Wall "
        "time is the whole run on 2 CPU cores.",
        "",
        *table(rows),
    ]
    counts = [(d, m, runs[0]["phases"]) for d, m, runs in rows if "phases" in runs[0]]
    if counts and all("num_params" in p for _, _, phases in counts for p in phases):
        lines += [
            "",
            "Parameters of the model each phase ends with (all seeds alike):",
            "",
            "| dataset | method | "
            + " | ".join(f"phase {i}" for i in range(len(counts[0][2])))
            + " |",
            "|---|---|" + "---|" * len(counts[0][2]),
        ]
        for dataset, method, phases in counts:
            cells = " | ".join(f"{p['num_params']['']:,}" for p in phases)
            lines.append(f"| {dataset} | {method} | {cells} |")
    if f.note:
        lines += ["", f.note]
    text = "\n".join(lines) + "\n"
    if f.out:
        with open(f.out, "w") as out:
            out.write(text)
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)

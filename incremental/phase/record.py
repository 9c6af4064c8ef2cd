"""The record stage: a phase's entry of results.json, and the document made of every phase's."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax

from incremental import evaluate, online, report, surgery
from incremental.phase.begin import PhaseRun
from incremental.protocol import Protocol, scenario_of

RESULTS_FILE = "results.json"


def record(
    protocol: Protocol,
    pr: PhaseRun,
    variables,
    row: dict,
    metrics: dict,
    seconds: dict,
    fingerprint: str = "",
) -> dict:
    """The phase's entry: what it trained on, its final loss, its timings and its evaluation rows.

    `seconds` holds `train_seconds` and `eval_seconds` (and whatever else the caller timed).
    """
    info = pr.info
    return {
        "phase": info.phase,
        "classes": [int(c) for c in protocol.class_order[info.num_old : info.num_seen]],
        "num_seen": info.num_seen,
        "num_train_examples": pr.num_train,
        "data_fingerprint": fingerprint,  # of the data the phase trained on (`load.fingerprint`)
        # The seen classes' head columns (a `head.capacity` head holds zero ones for the others).
        "num_params": surgery.count_params(
            surgery.narrow_head(variables["params"], info.num_seen), depth=1
        ),
        "epochs": pr.epochs,
        "final_loss": float(metrics["loss"]) if metrics else None,
        "final_train_accuracy": float(metrics["accuracy"]) if metrics else None,
        **seconds,
        **row,
        **({} if pr.init_row is None else {"random_init_row": pr.init_row}),
    }


# Rows of a phase's record that results.json reports as matrices and lists, not per phase.
SCENARIO_ROWS = ("ahead_row", "class_incremental_row", "random_init_row")


def scenario_results(config, records: list[dict], matrix: list) -> dict:
    """The scenario's numbers (README, "Results format"): learning accuracy and forward transfer
    (`evaluate.transfer`), top-5 accuracy where reported, and the task scenario's one-head ones."""
    init = records[0].get("random_init_row")  # the domain scenario's, scored at phase 0's init
    before = None
    if init is not None:  # accuracy on phase i after phase i - 1: its first `ahead_row` entry
        before = [None] + [r["ahead_row"][0] if r.get("ahead_row") else None for r in records[:-1]]
    out = {
        "scenario": scenario_of(config),
        **evaluate.transfer(matrix, before, init),
        "random_init_accuracy": init,
        "accuracy_before_learning": before,
    }
    if all("top5_accuracy" in r for r in records):
        out["top5_accuracy"] = [r["top5_accuracy"] for r in records]
    if all("class_incremental_row" in r for r in records):
        out["class_incremental_accuracy"] = [r["class_incremental_accuracy"] for r in records]
        out["class_incremental_matrix"] = [r["class_incremental_row"] for r in records]
    return out


def extra_results(records: list[dict]) -> dict:
    """`<name>_accuracy_matrix`, `<name>_accuracy`, ... for each extra classifier of the method."""
    out = {}
    for name in records[-1].get("extra", {}):
        rows = [r["extra"][name] for r in records]
        matrix, accuracy = [r["row"] for r in rows], [r["accuracy"] for r in rows]
        summary = evaluate.summarize(matrix, accuracy)
        out.update({f"{name}_{key}": value for key, value in summary.items()})
        out[f"{name}_accuracy"] = accuracy
        out[f"{name}_accuracy_matrix"] = matrix
    return out


def pycil_forgetting(records: list[dict]) -> float | None:
    """`evaluate.pycil_forgetting` of the records' grouped rows (None for records written before
    they were kept)."""
    if any("grouped_row" not in r for r in records):
        return None
    return evaluate.pycil_forgetting([r["grouped_row"] for r in records])


def results_from_records(config, protocol: Protocol, records: list[dict]) -> dict:
    """The public `results.json` document (see README, "Results")."""
    matrix = [r["row"] for r in records]
    accuracy = [r["accuracy"] for r in records]
    return {
        "format_version": 1,
        "method": config.method,
        "dataset": config.dataset.name,
        "class_order": list(protocol.class_order),
        "class_names": None if protocol.class_names is None else list(protocol.class_names),
        "phase_sizes": list(protocol.phase_sizes),
        "num_phases": protocol.num_phases,
        "complete": len(records) == protocol.num_phases,
        # What the accuracies are measured on: the test set, or (`dataset.validation`) a
        # validation split of the training data.
        "evaluated_on": "validation" if config.dataset.get("validation", 0.0) else "test",
        **evaluate.summarize(matrix, accuracy),
        **scenario_results(config, records, matrix),
        "forgetting_pycil": pycil_forgetting(records),
        "accuracy": accuracy,
        "accuracy_matrix": matrix,
        "task_aware_accuracy": [r["task_aware_accuracy"] for r in records],
        "task_aware_matrix": [r["task_aware_row"] for r in records],
        "old_accuracy": [r["old_accuracy"] for r in records],
        "new_accuracy": [r["new_accuracy"] for r in records],
        **extra_results(records),
        **online.results(config, records),
        "phases": [
            {
                k: v
                for k, v in r.items()
                if k not in ("row", "task_aware_row", "grouped_row", "extra", *SCENARIO_ROWS)
            }
            for r in records
        ],
        "config": config.to_dict(),
        "versions": versions(),
    }


def versions() -> dict:
    import flax
    import orbax.checkpoint as ocp

    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": ocp.__version__,
        "numpy": np.__version__,
    }


def write_results(workdir: str, results: dict) -> None:
    path = os.path.join(workdir, RESULTS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=json_default)
    os.replace(tmp, path)  # readers never see a half-written file


def repair_results(workdir: str, results: dict) -> str | None:
    """Rewrites `results.json` from `results` (what the checkpoints recorded) when the file is
    missing, does not parse, or disagrees with them outside `config` and `versions` (which a
    resumed run may change), with a warning; returns what was wrong, or None."""
    path = os.path.join(workdir, RESULTS_FILE)
    expected = json.loads(json.dumps(results, default=json_default))
    try:
        with open(path) as f:
            found = json.load(f)
    except FileNotFoundError:
        problem = "was missing"
    except (OSError, ValueError) as error:
        problem = f"could not be read ({type(error).__name__})"
    else:
        keys = [
            k
            for k in expected
            if k not in ("config", "versions") and found.get(k, "<missing>") != expected[k]
        ]
        problem = f"disagreed with the checkpoints in {', '.join(keys)}" if keys else None
    if problem is not None:
        write_results(workdir, results)
        report.console.print(
            f"warning: {path} {problem}; rewrote it from the checkpoints.",
            soft_wrap=True,
            markup=False,
        )
    return problem


def json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)

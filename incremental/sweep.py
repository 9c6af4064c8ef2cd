"""Sweeps: a grid of runs, each point in its own work directory, several at a time.

    incremental sweep --config=configs/digits.py --sweep='method=[replay,icarl];seed=[0,1,2]' \
        --workdir=runs/grid [--parallel=2] [--point=K]

The points are the product of `--sweep`'s lists (the last key varies fastest), or what the config
file's `get_sweep()` returns (big_vision's convention: a list of dicts of overrides), or both
(every point of the file's list with every point of the grid). Point k runs
`incremental run --config=FILE[:ARG] --config.KEY=VALUE ... --workdir=DIR/kkk-KEY=VALUE,...` in a
process of its own; `method` goes into the config file's argument (`FILE:method=replay`), where the
configs choose a method's defaults. A point whose results.json is complete is skipped, an
unfinished one resumes (the run's own resume), so a killed sweep continues where it stopped when
the same command runs again. `--point=K` runs only point K (one task of a SLURM array, say). With `--seeds_together` the grid's
`seed` values become one point's `config.seeds`: its seeds train in one vmapped program
(`incremental.seeds`), each in a `seed_<s>/` work directory of the point's.
`DIR/sweep.json` lists the points, their directories, statuses and last accuracies.

Hyper-parameter selection without the test set: `--select=train.lr` runs every point first with
`--config.dataset.validation=0.1` (`--validation`: each class's held-out fraction of the training
data is evaluated instead of the test set) in DIR/validation/, chooses for each combination of the
other swept keys the `train.lr` whose mean `--select_metric` over seeds (average incremental
accuracy by default) is best, records the candidates' scores and the choice in DIR/selection.json,
and runs only the chosen points on the test set. On a terminal
the sweep shows one live line per running point (`point_line`: its phase, step, loss and speed,
read from the tail of the point's metrics.jsonl).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

SWEEP_FILE = "sweep.json"
SELECTION_FILE = "selection.json"
_GRID_ITEM = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*\[(.*)\]\s*$")


def parse_grid(text: str) -> list[dict[str, str]]:
    """'method=[replay,icarl];seed=[0,1]' -> the product of the lists, the last key fastest."""
    if not text.strip():
        return [{}]
    keys, values = [], []
    for item in text.split(";"):
        found = _GRID_ITEM.match(item)
        if found is None:
            raise ValueError(
                f"--sweep item {item.strip()!r} is not KEY=[V1,V2,...]; e.g. "
                "--sweep='method=[replay,icarl];train.lr=[0.1,0.05]'."
            )
        options = [v.strip() for v in found[2].split(",") if v.strip()]
        if not options or found[1] in keys:
            raise ValueError(f"--sweep key {found[1]!r} has no values or appears twice.")
        keys.append(found[1])
        values.append(options)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def file_points(config_file: str) -> list[dict[str, str]]:
    """The config file's `get_sweep()` (a list of dicts of overrides), or [{}] when it has none."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_incremental_sweep_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        return [{}]
    points = module.get_sweep()
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ValueError(f"{config_file}: get_sweep() must return a list of dicts of overrides.")
    return [{str(k): _text(v) for k, v in p.items()} for p in points]


def points(config_file: str, grid: str, seeds_together: bool = False) -> list[dict[str, str]]:
    """Every point of the sweep: the file's points times the command line's grid. With
    `seeds_together`, the grid's seeds are one point's `config.seeds` (trained vmapped)."""
    grid_points = parse_grid(grid)
    if seeds_together and all("seed" in p for p in grid_points):
        seeds = list(dict.fromkeys(p["seed"] for p in grid_points))
        rest = list(
            {json.dumps({k: v for k, v in p.items() if k != "seed"}): 0 for p in grid_points}
        )
        grid_points = [{**json.loads(r), "seeds": f"({','.join(seeds)},)"} for r in rest]
    found = [{**a, **b} for a in file_points(config_file) for b in grid_points]
    if found == [{}]:
        raise ValueError(
            "The sweep has no points: give --sweep='KEY=[V1,V2];...' or a get_sweep() in the "
            "config file."
        )
    return found


def point_dir(workdir: str, index: int, overrides: dict[str, str]) -> str:
    name = ",".join(f"{k}={v}" for k, v in overrides.items())
    return os.path.join(workdir, f"{index:03d}-" + re.sub(r"[^\w.,=+-]+", "_", name)[:100])


def command(config: str, overrides: dict[str, str], workdir: str) -> list[str]:
    """The `incremental run` command line of one point."""
    path, _, arg = config.partition(":")
    args = dict(a.split("=", 1) for a in arg.split(",") if "=" in a)
    if "method" in overrides:
        args["method"] = overrides["method"]
    config_arg = path + (":" + ",".join(f"{k}={v}" for k, v in args.items()) if args else "")
    flags = [f"--config.{k}={v}" for k, v in overrides.items() if k != "method"]
    return [sys.executable, "-m", "incremental.main", "run", f"--config={config_arg}", *flags,
            f"--workdir={workdir}", "--config.log.progress=False"]  # fmt: skip


def status(workdir: str) -> str:
    """'done' (results.json complete), 'partial' (started) or 'new'."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            return "done" if json.load(f).get("complete") else "partial"
    except (OSError, ValueError):
        return "partial" if os.path.isdir(workdir) else "new"


def last_accuracy(workdir: str) -> float | None:
    """The run's last accuracy (its mean over seeds for a `config.seeds` point)."""
    return result(workdir, "last_accuracy")


def result(workdir: str, key: str) -> float | None:
    """results.json's `key` (its mean over seeds, `KEY_mean`, for a `config.seeds` point)."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc.get(key, doc.get(f"{key}_mean"))


def point_line(entry: dict) -> str:
    """A running point's progress: its overrides, then its latest phase, step, loss, examples/s
    and the accuracy of its last evaluation, from the tail of its metrics.jsonl."""
    name = ",".join(f"{k}={v}" for k, v in entry["overrides"].items())
    lines = _tail_lines(_metrics_path(entry["workdir"]))
    train = next((m for m in reversed(lines) if m.get("kind") == "train"), None)
    if train is None:
        return f"point {entry['point']} {name}: starting"
    text = f"point {entry['point']} {name}: phase {train['phase']} step {train['step']}"
    text += f" loss {train['loss']:.3f}"
    rate = next(
        (m["examples_per_second"] for m in reversed(lines) if "examples_per_second" in m), 0
    )
    evals = [m for m in lines if m.get("kind") == "eval" and m.get("accuracy") is not None]
    text += f" {rate:,.0f} ex/s" if rate else ""
    return text + (
        f" (phase {evals[-1]['phase']}: {100 * evals[-1]['accuracy']:.1f}%)" if evals else ""
    )


def _metrics_path(workdir: str) -> str:
    """The point's metrics.jsonl (of its first seed for a `--seeds_together` point)."""
    path = os.path.join(workdir, "metrics.jsonl")
    seeds = sorted(d for d in _listdir(workdir) if d.startswith("seed_"))
    return os.path.join(workdir, seeds[0], "metrics.jsonl") if seeds else path


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _tail_lines(path: str, size: int = 16384) -> list[dict]:
    """The complete JSON lines in the last `size` bytes of `path` (none if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - size)
            f.seek(start)
            lines = f.read().decode(errors="replace").split("\n")
    except OSError:
        return []
    found = []
    for line in lines[1 if start else 0 : -1]:  # a cut first line, and the unfinished last
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def run_sweep(
    config: str, workdir: str, grid: str = "", *, parallel: int = 1, point: int | None = None,
    seeds_together: bool = False, say=print, watch=None, select: Sequence[str] = (),
    validation: float = 0.1, metric: str = "average_incremental_accuracy",
) -> list[dict]:  # fmt: skip
    """Runs the sweep's points that are not done; returns their entries (as in sweep.json).

    `watch(entries)`, if given, is called about once a second with the running points' entries.
    With `select` (swept keys), the points first run on a validation split (`validation` of each
    class's training data, in DIR/validation/), the values of `select` with the best mean `metric`
    over seeds are chosen for each combination of the other keys (`choose`, written to
    DIR/selection.json), and only the chosen points then run on the test set; the entries of the
    others are marked `"selected": False`."""
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}.")
    found = points(config.partition(":")[0], grid, seeds_together)
    if point is not None and not 0 <= point < len(found):
        raise ValueError(f"--point={point}: the sweep has points 0..{len(found) - 1}.")
    entries = [
        {"point": k, "overrides": o, "workdir": point_dir(workdir, k, o)}
        for k, o in enumerate(found)
    ]
    os.makedirs(workdir, exist_ok=True)
    chosen = [e for e in entries if point is None or e["point"] == point]
    if select:
        check_selection(found, select, validation, point)
        os.makedirs(os.path.join(workdir, "validation"), exist_ok=True)
        held_out = [
            {**e, "overrides": {**e["overrides"], "dataset.validation": str(validation)},
             "workdir": point_dir(os.path.join(workdir, "validation"), e["point"], e["overrides"])}
            for e in entries
        ]  # fmt: skip
        _run_points(config, held_out, held_out, parallel, say, watch, "validation points")
        if any(e["status"] != "done" for e in held_out):
            return held_out  # stopped or failed: the same command continues
        choice = choose(held_out, select, metric)
        _write(os.path.join(workdir, SELECTION_FILE), choice)
        picked = {k for c in choice for k in c["points"]}
        chosen = [e for e in entries if e["point"] in picked]
        for e in entries:
            e["selected"] = e["point"] in picked
            say(f"point {e['point']} {'chosen' if e['selected'] else 'not chosen'}")
    _run_points(config, entries, chosen, parallel, say, watch, "points")
    _write(os.path.join(workdir, SWEEP_FILE), entries)
    return entries


def check_selection(found: list[dict], select: Sequence[str], fraction: float, point) -> None:
    """Refuses a selection that cannot be made: keys not swept, a fraction outside (0, 1)."""
    if point is not None:
        raise ValueError(
            "--select runs a validation sweep and then the chosen points; it cannot run one "
            "--point. On a cluster, sweep with --config.dataset.validation=F, then run the "
            "points that `incremental report` shows best."
        )
    missing = [k for k in select if len({p.get(k) for p in found}) < 2]
    if missing:
        raise ValueError(f"--select={','.join(select)}: {', '.join(missing)} not swept (give "
                         "each selected key two or more values in --sweep or get_sweep()).")  # fmt: skip
    if not 0 < fraction < 1:
        raise ValueError(f"--validation must be in (0, 1), got {fraction}.")


def choose(entries: Sequence[dict], select: Sequence[str], metric: str) -> list[dict]:
    """For each combination of the keys not in `select` (the seeds pooled), every candidate's
    mean `metric` over its finished points and the candidate chosen: the best (the first in
    sweep order on a tie). Returns `[{"group", "candidates": [{"values", metric, "points"}],
    "chosen", "points"}]` in sweep order."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for e in entries:
        o = e["overrides"]
        rest = {
            k: v for k, v in o.items() if k not in (*select, "seed", "seeds", "dataset.validation")
        }
        values = {k: o[k] for k in select if k in o}
        groups.setdefault(json.dumps(rest), {}).setdefault(json.dumps(values), []).append(e)
    out = []
    for rest, candidates in groups.items():
        scored = []
        for values, mine in candidates.items():
            scores = [result(e["workdir"], metric) for e in mine]
            if any(v is None for v in scores):
                raise ValueError(f"The validation runs of points {[e['point'] for e in mine]} "
                                 f"have no {metric!r} in their results.json.")  # fmt: skip
            scored.append({"values": json.loads(values), metric: sum(scores) / len(scores),
                           "points": [e["point"] for e in mine]})  # fmt: skip
        best = max(scored, key=lambda c: c[metric])
        out.append({"group": json.loads(rest), "candidates": scored, "chosen": best["values"],
                    "points": best["points"]})  # fmt: skip
    return out


def _run_points(config, entries, chosen, parallel: int, say, watch, what: str) -> None:
    """Runs the entries of `chosen` that are not done, then records every entry's status."""
    todo = []
    for entry in chosen:
        entry["before"] = status(entry["workdir"])
        if entry["before"] != "done":
            todo.append(entry)
    where = os.path.dirname(entries[0]["workdir"])
    say(f"{len(entries)} {what}; {len(chosen) - len(todo)} done, {len(todo)} to run in {where}")
    codes = _run_all(config, todo, parallel, say, watch)
    for entry in entries:
        entry["status"] = status(entry["workdir"])
        entry["exit_code"] = codes.get(entry["point"])
        entry["last_accuracy"] = last_accuracy(entry["workdir"])


def _run_all(config: str, todo: Sequence[dict], parallel: int, say, watch) -> dict[int, int]:
    """Runs the points `parallel` at a time; SIGTERM/SIGINT reach every running point, which saves
    and stops (the same sweep command resumes them)."""
    running: dict[int, subprocess.Popen] = {}
    entries: dict[int, dict] = {}
    codes: dict[int, int] = {}
    watched = 0.0
    queue = list(todo)
    stop = []

    def forward(signum, frame):
        del frame
        stop.append(signum)
        for proc in running.values():
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or running:
            while queue and len(running) < parallel and not stop:
                entry = queue.pop(0)
                log = open(entry["workdir"] + ".log", "a")  # noqa: SIM115 -- the child writes it
                cmd = command(config, entry["overrides"], entry["workdir"])
                running[entry["point"]] = subprocess.Popen(
                    cmd, stdout=log, stderr=log, preexec_fn=_term_with_parent
                )
                entries[entry["point"]] = entry
                say(f"point {entry['point']} {entry['before']}: {' '.join(cmd[3:])}")
            for k, proc in list(running.items()):
                if proc.poll() is not None:
                    codes[k] = running.pop(k).returncode
                    say(f"point {k} ended with exit status {codes[k]}")
            if stop and not running:
                break
            if watch is not None and running and time.monotonic() - watched >= 1:
                watched = time.monotonic()
                watch([entries[k] for k in running])
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return codes


def _term_with_parent() -> None:
    """In a point's process (Linux): SIGTERM when the sweep dies, however it dies (SIGKILL too),
    so the point saves and stops instead of running on unwatched."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere a killed sweep leaves its points to finish on their own


def main(argv: list[str], say=print, console=None) -> int:
    """`incremental sweep ...`; the exit status: 0 when every point is done, 3 when a signal
    stopped the sweep (the same command resumes it), 1 when a point failed. With a rich `console`
    that is a terminal, the running points' lines are shown live."""
    import argparse

    parser = argparse.ArgumentParser(prog="incremental sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file, optionally with :ARG")
    parser.add_argument("--sweep", default="", help="KEY=[V1,V2,...];KEY=[...]")
    parser.add_argument("--workdir", required=True, help="the sweep's directory")
    parser.add_argument("--parallel", type=int, default=1, help="points run at once")
    parser.add_argument("--point", type=int, default=None, help="run only this point")
    parser.add_argument(
        "--seeds_together", action="store_true", help="the seeds of a point in one vmapped run"
    )
    parser.add_argument("--select", default="", help="KEY,KEY: swept keys chosen on validation")
    parser.add_argument("--validation", type=float, default=0.1, help="held-out fraction")
    parser.add_argument(
        "--select_metric", default="average_incremental_accuracy", help="results.json key"
    )
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config.partition(":")[0]):
        raise ValueError(f"--config: {args.config.partition(':')[0]} is not a file.")
    with _live(console) as watch:
        entries = run_sweep(args.config, args.workdir, args.sweep, parallel=args.parallel,
                            point=args.point, seeds_together=args.seeds_together,
                            say=lambda line: say(line, markup=False, soft_wrap=True),
                            watch=watch, select=[k for k in args.select.split(",") if k],
                            validation=args.validation, metric=args.select_metric)  # fmt: skip
    chosen = [
        e
        for e in entries
        if (args.point is None or e["point"] == args.point) and e.get("selected", True)
    ]
    for e in chosen:
        accuracy = "-" if e["last_accuracy"] is None else f"{100 * e['last_accuracy']:.1f}%"
        say(
            f"{e['point']:>4} {e['status']:<8} {accuracy:>7}  {e['workdir']}",
            markup=False,
            soft_wrap=True,
        )
    if any(e["exit_code"] == 3 for e in chosen):
        say("Stopped; run the same command again to resume.", markup=False)
        return 3
    return 0 if all(e["status"] == "done" for e in chosen) else 1


@contextlib.contextmanager
def _live(console):
    """A `watch` that shows the running points' lines under the sweep's output on a terminal."""
    if console is None or not console.is_terminal:
        yield None
        return
    from rich.live import Live
    from rich.text import Text

    with Live(Text(""), console=console, transient=True, auto_refresh=False) as live:
        yield lambda running: live.update(
            Text("\n".join(point_line(e) for e in running)), refresh=True
        )


def _write(path: str, entries: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(tmp, path)


def _text(value) -> str:
    """A config value as `--config.KEY=` text (tuples as absl reads them)."""
    if isinstance(value, tuple | list):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)

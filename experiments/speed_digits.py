"""Whole-process time of the split-digits protocol, head widening every phase against one compile.

    python experiments/speed_digits.py --out=experiments/speed_digits.md
    python experiments/speed_digits.py --methods=replay,lwf --seeds=1     # a quicker look

The protocol of the PyTorch comparison: digits in 5 phases of 2 classes, MLP 64-256-256, 30 epochs,
batch 32, memory 200 (configs/digits.py). For each method and head (`widen`: head.capacity=0;
`capacity`: the default, one program for the run where the method allows), one fresh Python process
runs the seeds one after another (as a PyTorch toolbox does); `vmapped` runs them as one run with
`config.seeds` (the default head: one vmapped program for every seed and phase). Each process runs
first with an empty persistent compilation cache (cold) and then again with the cache it filled
(warm). Printed per run: the process's wall seconds (imports included), the seconds its phases spent
compiling (for `vmapped`, XLA's backend compile seconds: its phases do not time compiles), training
and evaluating, and the number of XLA compiles (`/jax/core/compile/backend_compile_duration` events;
a program read from the cache counts as well, as a hit).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE = "/jax/core/compile/backend_compile_duration"
HEADS = {"widen": 0, "capacity": -1, "vmapped": -1}

flags.DEFINE_list(
    "methods", ["finetune", "replay", "icarl", "bic", "der", "lwf", "ewc"], "Methods."
)
flags.DEFINE_integer("seeds", 3, "Seeds run one after another in each process.")
flags.DEFINE_string("out", None, "Markdown file to write (default: print only).")
flags.DEFINE_string("child", None, "Internal: METHOD,HEAD,CACHE_DIR,WORKDIR to run in-process.")
FLAGS = flags.FLAGS


def child(spec: str, seeds: int) -> None:
    """Runs the seeds in this process and prints one JSON line of totals."""
    method, head, cache, workdir = spec.split(",")
    sys.path.insert(0, ROOT)
    import jax

    from configs import digits
    from incremental import run as run_lib

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(seconds) if event == COMPILE else None
    )
    totals = {"compile": 0.0, "train": 0.0, "eval": 0.0, "capacity": None}
    vmapped = head == "vmapped"
    for seed in range(1 if vmapped else seeds):
        config = digits.get_config(f"method={method}")
        config.seed = seed
        config.seeds = tuple(range(seeds)) if vmapped else ()
        config.head.capacity = HEADS[head]
        config.compile_cache = cache
        config.log.progress = config.log.plot = False
        run_lib.run(config, os.path.join(workdir, str(seed)))
        done = [os.path.join(workdir, str(seed))]
        if vmapped:  # each seed's own results
            done = [os.path.join(done[0], f"seed_{s}") for s in range(seeds)]
        for path in done:
            with open(os.path.join(path, "results.json")) as f:
                results = json.load(f)
            totals["capacity"] = results["config"]["head"]["capacity"]
            for p in results["phases"]:
                totals["compile"] += p.get("compile_seconds", 0.0)
                totals["train"] += p["train_seconds"]
                totals["eval"] += p["eval_seconds"]
    if vmapped:
        totals["compile"] = sum(compiles)
    print(json.dumps({**totals, "compiles": len(compiles)}))


def one_process(method: str, head: str, cache: str, seeds: int) -> dict:
    workdir = tempfile.mkdtemp()
    spec = f"{method},{head},{cache},{workdir}"
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, f"--child={spec}", f"--seeds={seeds}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    wall = time.perf_counter() - start
    return {**json.loads(out.strip().splitlines()[-1]), "wall": wall}


def main(argv) -> None:
    del argv
    if FLAGS.child:
        child(FLAGS.child, FLAGS.seeds)
        return
    lines = [
        f"Digits, 5 phases x 2 classes, MLP 64-256-256, 30 epochs; {FLAGS.seeds} seeds in one "
        "process, one after another (widen, capacity) or vmapped (config.seeds).",
        "",
        "| method | head | capacity | cache | wall s | compile s | train s | eval s | compiles |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for method in FLAGS.methods:
        for head in HEADS:
            cache = tempfile.mkdtemp()
            for temperature in ("cold", "warm"):
                r = one_process(method, head, cache, FLAGS.seeds)
                line = (
                    f"| {method} | {head} | {r['capacity']} | {temperature} | {r['wall']:.1f} "
                    f"| {r['compile']:.1f} | {r['train']:.1f} | {r['eval']:.1f} | {r['compiles']} |"
                )
                lines.append(line)
                print(line, flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)

"""Several seeds in one program: each phase's train steps of every seed run together under `jax.vmap`.

`config.seeds=(0, 1, 2)` runs the seeds side by side. The between-phase hooks (teacher snapshots,
exemplar selection, evaluation) run for each seed in turn, as in a single run; the epochs, where the
time goes, run once for all seeds: parameters, optimizer state, method state and the train key are
stacked on a leading seed axis, and the training data are shared when every seed trains on the same
examples (stacked otherwise, as when exemplar memories differ). Each seed has its own work directory
`<workdir>/seed_<s>/` (checkpoints and results.json, as a run with `config.seed=s` would write), and
`<workdir>/results.json` reports every seed and the mean and standard deviation over seeds.

A seed's numbers are those of a separate run with that seed up to float rounding: batched matmuls
may sum in another order. The epochs run as one scan (`train.loop='scan'`), without within-phase
checkpoints or streaming; a killed run resumes after the last phase that every seed finished, and
SIGTERM/SIGINT stop it (saved) when the phase in progress ends.

With `head.capacity` (by default where the method allows it, as for a single run) the vmapped
epoch compiles once for the run, not once per phase: every seed trains on rows of the one
device-resident training set, and each seed's rows and counts (`train.PhaseArgs`) are an input
stacked on the seed axis.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from incremental import capacity, checkpoint, compilation, lock, parallel, report
from incremental.phase import begin, end, evaluate, fit, load, record, save
from incremental.preemption import Preempted, Preemption

SUMMARY_KEYS = ("last_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer")
# Summarised where every seed has them (not None): the scenarios' and the online protocol's numbers.
SCENARIO_KEYS = ("average_learning_accuracy", "forward_transfer", "average_online_accuracy")


def seed_config(config, seed: int):
    """`config` for one seed: `seed` set, `seeds` emptied, the epochs as one scan."""
    c = config.copy_and_resolve_references()
    c.seed, c.seeds, c.train.loop = seed, (), "scan"
    return c


def check(config) -> list[int]:
    seeds = [int(s) for s in config.seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config.seeds has repeated seeds: {seeds}.")
    if config.checkpoint.every_steps or config.checkpoint.every_epochs:
        raise ValueError(
            "config.seeds saves at phase ends only; set checkpoint.every_steps and "
            "checkpoint.every_epochs to 0."
        )
    if config.dataset.stream:
        raise ValueError("config.seeds keeps the data on the device; set dataset.stream=False.")
    return seeds


def stack(trees: list) -> object:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree, count: int) -> list:
    return [jax.tree.map(lambda leaf, i=i: leaf[i], tree) for i in range(count)]


def run_seeds(config, workdir: str, *, allow_data_change: bool = False) -> dict:
    """Runs (or resumes) every seed of `config.seeds`; returns the document of `results.json`."""
    seeds = check(config)
    configs = [seed_config(config, s) for s in seeds]
    data, protocol, method = load.validate(configs[0], workdir)
    dirs = [os.path.join(workdir, f"seed_{s}") for s in seeds]
    for d in dirs:
        load.make_workdir(d)
    compilation.use_cache(config.compile_cache)
    with lock.hold(workdir):  # one writer per work directory
        ckpts = [checkpoint.Checkpoints(d, config.checkpoint.keep) for d in dirs]
        try:
            # What each seed's checkpoints save and a resumed run compares (as `run` does).
            configs = [
                capacity.resolved(c, method, protocol.num_classes, k.saved_head_capacity())
                for c, k in zip(configs, ckpts, strict=True)
            ]
            first, carried, records = resume_seeds(
                ckpts, configs, dirs, method, protocol, data, allow_data_change
            )
            programs = capacity.Programs()  # head.capacity: shared by every seed and phase
            with Preemption(report.console) as preempt:
                for phase in range(first, protocol.num_phases):
                    if preempt.requested:  # the phases before are saved
                        raise Preempted(f"Stopped before phase {phase}, saved.")
                    start = time.perf_counter()
                    begun = [
                        begin.begin(
                            c,
                            method,
                            data,
                            protocol,
                            phase,
                            carried[i],
                            carried[i].method_state if carried[i] else method.init_state(),
                            programs,
                        )  # fmt: skip
                        for i, c in enumerate(configs)
                    ]
                    prs = [b[0] for b in begun]
                    states, states_m = [b[1] for b in begun], [b[2] for b in begun]
                    trained = train_together(prs, states, states_m, method, programs)
                    share = (time.perf_counter() - start) / len(seeds)
                    for i, c in enumerate(configs):
                        carried[i] = finish_seed(
                            c, method, data, protocol, prs[i], trained[i], share, programs,
                            ckpts[i], dirs[i], records[i],
                        )  # fmt: skip
        finally:
            for k in ckpts:
                k.close()
        per_seed = [
            record.results_from_records(c, protocol, r)
            for c, r in zip(configs, records, strict=True)
        ]
        doc = summarize(config, seeds, per_seed)
        record.write_results(workdir, doc)
        return doc


def resume_seeds(ckpts, configs, dirs, method, protocol, data, allow_data_change: bool):
    """The phase every seed resumes from (the earliest any seed stopped at), each seed's carried
    state from the phase before it, and each seed's records; repairs each seed's results.json."""
    found = [
        save.resume(k, c, method, protocol, data, allow_data_change=allow_data_change)
        for k, c in zip(ckpts, configs, strict=True)
    ]
    first = min(f[0] for f in found)
    found = [
        f if f[0] == first else save.restore(k, c, method, protocol, data, first - 1)
        for f, k, c in zip(found, ckpts, configs, strict=True)
    ]
    records = [f[3][:first] for f in found]
    for d, c, r in zip(dirs, configs, records, strict=True):
        if r:  # each seed's results.json as its checkpoints recorded it
            record.repair_results(d, record.results_from_records(c, protocol, r))
    return first, [f[1] for f in found], records


def finish_seed(
    config, method, data, protocol, pr, trained, train_share, programs, ckpts, workdir, records
):
    """One seed's end of a phase after the shared epochs: end, evaluate, record (appended to
    `records`, results.json written) and save; returns what it carries to the next phase."""
    state, method_state, steps = trained
    start = time.perf_counter()
    model, carried = end.end(config, method, data, pr, state, method_state)
    seconds = {"train_seconds": train_share + time.perf_counter() - start}
    start = time.perf_counter()
    phase = pr.info.phase
    row = evaluate.evaluate_phase(
        config, model, method, data, protocol, phase, carried.variables, carried.method_state,
        programs,
    )  # fmt: skip
    seconds["eval_seconds"] = time.perf_counter() - start
    records.append(
        record.record(
            protocol, pr, carried.variables, row, steps.last_epoch, seconds, data.fingerprint
        )
    )
    record.write_results(workdir, record.results_from_records(config, protocol, records))
    mesh = parallel.make_mesh(config.parallel.devices)
    save.save(
        ckpts, config, protocol, phase, carried, state.rng, records, mesh, data.fingerprint
    )  # fmt: skip
    return carried


def train_together(prs, states, method_states, method, programs) -> list[tuple]:
    """The phase's epochs of every seed in one vmapped scan; returns each seed's (state,
    method_state, fit.Steps). Under `head.capacity` the vmapped epoch comes from `programs`."""
    pr = prs[0]
    if len({p.num_train for p in prs}) != 1:
        raise ValueError(
            "config.seeds needs every seed to train on as many examples in a phase; got "
            f"{[p.num_train for p in prs]}."
        )
    shared = all(bool(jnp.array_equal(p.x, pr.x)) and bool(jnp.array_equal(p.y, pr.y)) for p in prs)
    data_axis = None if shared else 0
    xs = (pr.x, pr.y) if shared else (stack([p.x for p in prs]), stack([p.y for p in prs]))
    if pr.args is None:  # the head widens: a program for this phase's shapes
        epoch = jax.jit(jax.vmap(pr.train_epoch, in_axes=(0, 0, data_axis, data_axis)))
    else:  # one program for every phase with this setup; each seed's rows and counts an input
        vmapped = programs.get(
            ("seeds", method.setup(pr.info)),
            lambda: jax.jit(jax.vmap(pr.train_epoch, in_axes=(0, 0, None, None, 0))),
        )
        args = stack([p.args for p in prs])
        epoch = lambda state, method_state, x, y: vmapped(state, method_state, x, y, args)  # noqa: E731
    state, method_state = stack(list(states)), stack(list(method_states))
    steps = [fit.Steps.of(p) for p in prs]
    while steps[0].step < steps[0].total:
        state, method_state, metrics = epoch(state, method_state, *xs)
        for i, m in enumerate(unstack(metrics, len(prs))):
            steps[i].add(m)
    n = len(prs)
    return list(zip(unstack(state, n), unstack(method_state, n), steps, strict=True))


def summarize(config, seeds: list[int], per_seed: list[dict]) -> dict:
    """Each seed's headline numbers and matrices, and the mean and std over seeds."""
    doc = {
        "format_version": 1,
        "method": config.method,
        "dataset": config.dataset.name,
        "seeds": seeds,
        "complete": all(r["complete"] for r in per_seed),
        "per_seed": {
            str(s): {
                k: r[k]
                for k in (*SUMMARY_KEYS, *SCENARIO_KEYS, "accuracy", "accuracy_matrix")
                if k in r
            }
            for s, r in zip(seeds, per_seed, strict=True)
        },
        "config": config.to_dict(),
        "versions": record.versions(),
    }
    extra = tuple(k for k in per_seed[0] if k.endswith("_last_accuracy") or k in SCENARIO_KEYS)
    for key in SUMMARY_KEYS + extra:
        values = [r.get(key) for r in per_seed]
        if all(v is not None for v in values):
            doc[f"{key}_mean"] = float(np.mean(values))
            doc[f"{key}_std"] = float(np.std(values))
    doc["accuracy_mean"] = np.mean([r["accuracy"] for r in per_seed], axis=0).tolist()
    return doc

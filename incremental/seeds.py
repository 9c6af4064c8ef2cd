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
checkpoints or streaming; a killed run resumes after the last phase that every seed finished.

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

from incremental import capacity, checkpoint, compilation, lock, parallel
from incremental.phase import begin, end, evaluate, fit, load, record, save

SUMMARY_KEYS = ("last_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer")


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
    # What each seed's checkpoints save and a resumed run compares (as `run` does).
    configs = [capacity.resolved(c, method, protocol.num_classes) for c in configs]
    dirs = [os.path.join(workdir, f"seed_{s}") for s in seeds]
    for d in dirs:
        load.make_workdir(d)
    compilation.use_cache(config.compile_cache)
    with lock.hold(workdir):  # one writer per work directory
        ckpts = [checkpoint.Checkpoints(d, config.checkpoint.keep) for d in dirs]
        try:
            found = [
                save.resume(k, c, method, protocol, data, allow_data_change=allow_data_change)
                for k, c in zip(ckpts, configs, strict=True)
            ]
            first = min(f[0] for f in found)
            found = [
                f if f[0] == first else save.restore(k, c, method, protocol, data, first - 1)
                for f, k, c in zip(found, ckpts, configs, strict=True)
            ]
            carried, method_states = [f[1] for f in found], [f[2] for f in found]
            programs = capacity.Programs()  # head.capacity: shared by every seed and phase
            records = [f[3][:first] for f in found]
            for d, c, r in zip(dirs, configs, records, strict=True):
                if r:  # each seed's results.json as its checkpoints recorded it
                    record.repair_results(d, record.results_from_records(c, protocol, r))
            for phase in range(first, protocol.num_phases):
                start = time.perf_counter()
                begun = [
                    begin.begin(
                        c, method, data, protocol, phase, carried[i], method_states[i], programs
                    )
                    for i, c in enumerate(configs)
                ]
                prs = [b[0] for b in begun]
                states, states_m = [b[1] for b in begun], [b[2] for b in begun]
                trained = train_together(prs, states, states_m, method, programs)
                elapsed = time.perf_counter() - start
                for i, (c, pr, (state, method_state, steps)) in enumerate(
                    zip(configs, prs, trained, strict=True)
                ):
                    start = time.perf_counter()
                    model, carried[i] = end.end(c, method, data, pr, state, method_state)
                    seconds = {"train_seconds": elapsed / len(seeds) + time.perf_counter() - start}
                    start = time.perf_counter()
                    row = evaluate.evaluate_phase(
                        c,
                        model,
                        method,
                        data,
                        protocol,
                        phase,
                        carried[i].variables,
                        carried[i].method_state,
                        programs,
                    )
                    seconds["eval_seconds"] = time.perf_counter() - start
                    method_states[i] = carried[i].method_state
                    records[i].append(
                        record.record(
                            protocol,
                            pr,
                            carried[i].variables,
                            row,
                            steps.last_epoch,
                            seconds,
                            data.fingerprint,
                        )  # fmt: skip
                    )
                    record.write_results(
                        dirs[i], record.results_from_records(c, protocol, records[i])
                    )
                    mesh = parallel.make_mesh(c.parallel.devices)
                    save.save(
                        ckpts[i], c, protocol, phase, carried[i], state.rng, records[i], mesh,
                        data.fingerprint,
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
            str(s): {k: r[k] for k in (*SUMMARY_KEYS, "accuracy", "accuracy_matrix") if k in r}
            for s, r in zip(seeds, per_seed, strict=True)
        },
        "config": config.to_dict(),
        "versions": record.versions(),
    }
    for key in SUMMARY_KEYS + tuple(k for k in per_seed[0] if k.endswith("_last_accuracy")):
        values = [r.get(key) for r in per_seed]
        if all(v is not None for v in values):
            doc[f"{key}_mean"] = float(np.mean(values))
            doc[f"{key}_std"] = float(np.std(values))
    doc["accuracy_mean"] = np.mean([r["accuracy"] for r in per_seed], axis=0).tolist()
    return doc

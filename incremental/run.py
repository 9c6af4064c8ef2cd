"""`run(config, workdir)`: the phase loop, and nothing else; each phase is delegated to `train_phase`."""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from incremental import checkpoint, evaluate, methods, report, surgery, train
from incremental.data import device, sources
from incremental.methods import Method, PhaseContext, PhaseInfo
from incremental.models import build_model
from incremental.protocol import Protocol, make_protocol

PyTree = Any
RESULTS_FILE = "results.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class RunData(NamedTuple):
    """The dataset after the protocol: labels remapped to positions in the class order."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    norm: device.Normalizer
    is_image: bool


class PhaseResult(NamedTuple):
    variables: PyTree  # {'params': ..., 'batch_stats': ...}
    opt_state: optax.OptState
    method_state: dict
    record: dict  # the phase's entry of results.json


def named_key(key: jax.Array, name: str) -> jax.Array:
    """A key derived from `key` by name, so adding a new use of randomness never shifts the others."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def load_data(config) -> tuple[RunData, Protocol, sources.Source]:
    """Loads the source, builds the protocol and remaps the labels."""
    source = sources.load_source(
        config.dataset.name,
        data_dir=config.dataset.data_dir or None,
        download=config.dataset.download,
        seed=config.seed,
    )
    source = sources.subset_classes(source, config.dataset.classes)
    protocol = make_protocol(source.num_classes, config.protocol)
    norm = device.fit_normalizer(source.x_train, source.is_image)
    data = RunData(
        source.x_train,
        protocol.remap(source.y_train),
        source.x_test,
        protocol.remap(source.y_test),
        norm,
        source.is_image,
    )
    return data, protocol, source


def make_model(config, num_classes: int):
    if config.dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {config.dtype!r}; choose one of {sorted(DTYPES)}.")
    kwargs = dict(config.model.kwargs.to_dict())
    return build_model(config.model.name, num_classes, dtype=DTYPES[config.dtype], **kwargs)


def init_variables(config, model, x_example: np.ndarray, key: jax.Array) -> PyTree:
    variables = model.init(key, jnp.zeros((1, *x_example.shape), jnp.float32), train=False)
    variables = flax.core.unfreeze(variables)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def train_phase(
    config,
    method: Method,
    data: RunData,
    protocol: Protocol,
    phase: int,
    carried: PhaseResult | None,
    method_state: dict,
    progress: report.Progress,
) -> PhaseResult:
    """Widens, trains, runs the method's hooks and evaluates one phase."""
    start = time.perf_counter()
    info = PhaseInfo(phase, protocol.offsets[phase], protocol.phase_sizes[phase])
    phase_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), phase)
    model = make_model(config, info.num_seen)
    dtype = DTYPES[config.dtype]
    embed = train.make_apply_batches(model, data.norm, lambda out, _: out.features, dtype)
    ctx = PhaseContext(
        info,
        data.y_train,
        data.x_train,
        lambda v, x: train.run_batched(embed, v, {}, x, config.eval.batch_size),
    )
    if carried is None:
        variables = init_variables(config, model, data.x_train[0], named_key(phase_key, "init"))
    else:
        variables = widen(config, carried.variables, ctx, named_key(phase_key, "widen"))
    method_state = method.begin_phase(ctx, variables, method_state)

    idx = method.train_indices(ctx, method_state)
    if len(idx) == 0:
        raise ValueError(f"Phase {phase} has no training examples; check the dataset and protocol.")
    x_dev, y_dev = jax.device_put(data.x_train[idx]), jax.device_put(data.y_train[idx])
    batch_size = config.train.batch_size
    steps_per_epoch = -(-len(idx) // batch_size)
    hp = train.phase_hparams(config, phase)
    setup = method.setup(info)
    tx = train.make_optimizer(
        config.train, hp, steps_per_epoch, variables["params"], setup, info.num_old
    )
    opt_state = tx.init(variables["params"])
    if carried is not None and config.train.carry_opt_state:
        opt_state = train.carry_opt_state(carried.opt_state, opt_state, info.num_new) or opt_state
    state = train.TrainState(
        variables["params"],
        variables["batch_stats"],
        opt_state,
        named_key(phase_key, "train"),
        jnp.zeros((), jnp.int32),
    )
    augment = config.augment if data.is_image else {"crop_padding": 0, "flip": False}
    train_epoch = train.make_train_epoch(
        model=model,
        tx=tx,
        method=method,
        info=info,
        setup=setup,
        norm=data.norm,
        batch_size=batch_size,
        crop_padding=augment["crop_padding"],
        flip=augment["flip"],
        dtype=dtype,
    )
    metrics = {}
    for epoch in progress.epochs(phase, hp.epochs if setup.train else 0):
        state, method_state, metrics = train_epoch(state, method_state, x_dev, y_dev)
        metrics = jax.device_get(metrics)
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"Non-finite loss {metrics['loss']} in phase {phase}, epoch {epoch}; lower the "
                "learning rate or check the data. The last finished phase's checkpoint is kept."
            )
        progress.epoch_done(metrics)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    method_state = method.end_phase(ctx, variables, method_state)
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    row = evaluate_phase(config, model, method, data, protocol, phase, variables, method_state)
    record = {
        "phase": phase,
        "classes": [int(c) for c in protocol.class_order[info.num_old : info.num_seen]],
        "num_seen": info.num_seen,
        "num_train_examples": int(len(idx)),
        "epochs": hp.epochs if setup.train else 0,
        "final_loss": float(metrics["loss"]) if metrics else None,
        "final_train_accuracy": float(metrics["accuracy"]) if metrics else None,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
        **row,
    }
    return PhaseResult(variables, state.opt_state, method_state, record)


def widen(config, variables: PyTree, ctx: PhaseContext, key: jax.Array) -> PyTree:
    """The previous phase's variables with head columns for this phase's new classes."""
    info = ctx.info
    class_means = None
    if config.head.init == "imprint":
        idx = methods.base.data_of_classes(ctx.y_train, info.num_old, info.num_seen)
        feats = ctx.embed(variables, ctx.x_train[idx])
        labels = ctx.y_train[idx] - info.num_old
        class_means = jnp.stack([feats[labels == c].mean(0) for c in range(info.num_new)])
    params = surgery.widen_head(
        variables["params"], info.num_new, key, config.head.init, class_means=class_means
    )
    return {"params": params, "batch_stats": variables["batch_stats"]}


def evaluate_phase(config, model, method, data, protocol, phase, variables, method_state) -> dict:
    """Scores the test data of every seen class and returns the phase's rows of the matrices."""
    seen = data.y_test < protocol.num_seen(phase)
    predict = train.make_apply_batches(model, data.norm, method.predict, DTYPES[config.dtype])
    scores = train.run_batched(
        predict, variables, method_state, data.x_test[seen], config.eval.batch_size
    )
    return evaluate.evaluate_phase(scores, data.y_test[seen], protocol, phase)


def results_from_records(config, protocol: Protocol, records: list[dict]) -> dict:
    """The public `results.json` document (see README, "Results")."""
    matrix = [r["row"] for r in records]
    accuracy = [r["accuracy"] for r in records]
    return {
        "format_version": 1,
        "method": config.method,
        "dataset": config.dataset.name,
        "class_order": list(protocol.class_order),
        "phase_sizes": list(protocol.phase_sizes),
        "num_phases": protocol.num_phases,
        "complete": len(records) == protocol.num_phases,
        **evaluate.summarize(matrix, accuracy),
        "accuracy": accuracy,
        "accuracy_matrix": matrix,
        "task_aware_accuracy": [r["task_aware_accuracy"] for r in records],
        "task_aware_matrix": [r["task_aware_row"] for r in records],
        "old_accuracy": [r["old_accuracy"] for r in records],
        "new_accuracy": [r["new_accuracy"] for r in records],
        "phases": [
            {k: v for k, v in r.items() if k not in ("row", "task_aware_row")} for r in records
        ],
        "config": config.to_dict(),
        "versions": versions(),
    }


def versions() -> dict:
    import flax as _flax
    import orbax.checkpoint as _ocp

    return {
        "jax": jax.__version__,
        "flax": _flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": _ocp.__version__,
        "numpy": np.__version__,
    }


def write_results(workdir: str, results: dict) -> None:
    path = os.path.join(workdir, RESULTS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    os.replace(tmp, path)  # readers never see a half-written file


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def state_target(config, method, protocol, data, phase) -> PyTree:
    """Shapes and types of the state saved at the end of `phase`, for restoring it."""
    info = PhaseInfo(phase, protocol.offsets[phase], protocol.phase_sizes[phase])
    model = make_model(config, info.num_seen)
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(lambda: init_variables(config, model, data.x_train[0], key))
    hp = train.phase_hparams(config, phase)
    tx = train.make_optimizer(
        config.train, hp, 1, variables["params"], method.setup(info), info.num_old
    )
    return {**variables, "opt_state": jax.eval_shape(tx.init, variables["params"]), "rng": key}


def resume(ckpts, config, method, protocol, data) -> tuple[int, PhaseResult | None, dict, list]:
    """The phase to start from and what the last finished phase left, from the work directory."""
    last = ckpts.latest_phase()
    if last is None:
        return 0, None, method.init_state(), []
    saved = ckpts.read_meta(last)
    diffs = checkpoint.config_diff(saved["config"], config.to_dict())
    if diffs:
        raise ValueError(
            f"The work directory {os.path.dirname(ckpts.directory)} holds a run with a different "
            "config; resume it with the same config or pick a new --workdir. Differences:\n  "
            + "\n  ".join(diffs)
        )
    target = state_target(config, method, protocol, data, last)
    state, method_state, meta = ckpts.restore(last, target)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    carried = PhaseResult(variables, state["opt_state"], method_state, meta["records"][-1])
    return last + 1, carried, method_state, meta["records"]


def run(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the phases of `config` in `workdir` and returns the results document.

    Args:
      config: the run's ConfigDict (see `incremental.config.base_config`).
      workdir: where results.json, the plot and the checkpoints go; a directory that already holds
        checkpoints of the same config is resumed after its last finished phase.
      stop_after: stop after this phase (a staged run; calling again resumes).
    """
    os.makedirs(workdir, exist_ok=True)
    data, protocol, _ = load_data(config)
    method = methods.build(config.method, config.method_args)
    ckpts = checkpoint.Checkpoints(workdir)
    first, carried, method_state, records = resume(ckpts, config, method, protocol, data)
    progress = report.Progress(protocol, enabled=config.log.progress, start=first)
    results = results_from_records(config, protocol, records) if records else None
    with progress:
        last = (
            protocol.num_phases - 1
            if stop_after is None
            else min(stop_after, protocol.num_phases - 1)
        )
        for phase in range(first, last + 1):
            carried = train_phase(
                config, method, data, protocol, phase, carried, method_state, progress
            )
            method_state = carried.method_state
            records.append(carried.record)
            results = results_from_records(config, protocol, records)
            write_results(workdir, results)
            state = {
                **carried.variables,
                "opt_state": carried.opt_state,
                "rng": jax.random.fold_in(jax.random.PRNGKey(config.seed), phase),
            }
            meta = {
                "phase": phase,
                "records": records,
                "config": config.to_dict(),
                "class_order": list(protocol.class_order),
            }
            ckpts.save(
                phase, state, method_state, json.loads(json.dumps(meta, default=_json_default))
            )
            progress.phase_done(carried.record)
    ckpts.close()
    if config.log.plot and results is not None:
        report.plot(results, os.path.join(workdir, "accuracy.png"))
    return results

"""`run(config, workdir)`: the phase loop, and nothing else; each phase is delegated to `train_phase`."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
import time
import zlib
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from incremental import (
    capacity,
    checkpoint,
    compilation,
    evaluate,
    methods,
    models,
    parallel,
    report,
    surgery,
    train,
)
from incremental.data import device, sources
from incremental.data.stream import StreamingBatches
from incremental.methods import Method, PhaseContext, PhaseInfo, base
from incremental.models import MODELS, build_backbone, build_model
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


def make_model(config, num_classes: int, head: str = "linear"):
    if config.dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {config.dtype!r}; choose one of {sorted(DTYPES)}.")
    kwargs = dict(config.model.kwargs.to_dict())
    return build_model(
        config.model.name, num_classes, head=head, dtype=DTYPES[config.dtype], **kwargs
    )


def train_loop(config) -> str:
    """`config.train.loop`, with 'auto' resolved: a Python loop of steps for convolutional models on
    CPU, where XLA runs convolution gradients far slower inside a scan; the scan elsewhere."""
    loop = config.train.loop
    if loop != "auto":
        return loop
    return "steps" if jax.default_backend() == "cpu" and config.model.name != "mlp" else "scan"


def phase_model(
    config, method: Method, info: PhaseInfo, *, final: bool = False, num_classes: int = 0
):
    """The phase's model: the method's backbone (built from the config's) and its head's classes.

    The head has `num_classes` columns if given, else `config.head.capacity` if set, else the
    phase's `num_seen`.
    """
    if config.dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {config.dtype!r}; choose one of {sorted(DTYPES)}.")
    kwargs = dict(config.model.kwargs.to_dict())

    def make(part: str = "all"):
        extra = {} if part == "all" else {"part": part}
        return build_backbone(config.model.name, dtype=DTYPES[config.dtype], **kwargs, **extra)

    backbone = method.backbone(make, info, final=final)
    width = num_classes or config.head.capacity or info.num_seen
    return models.classifier(backbone, width, method.head)


def make_context(config, data: RunData, info: PhaseInfo, model) -> PhaseContext:
    """The host-side context of the between-phase hooks, applying `model`."""
    dtype = DTYPES[config.dtype]
    embed = train.make_apply_batches(model, data.norm, lambda out, _: out.features, dtype)
    return PhaseContext(
        info,
        data.y_train,
        data.x_train,
        lambda v, x: train.run_batched(embed, v, {}, x, config.eval.batch_size),
        apply_fn=functools.partial(train.apply_any_head, model),
        normalize=functools.partial(device.normalize, norm=data.norm, dtype=dtype),
        seed=config.seed,
        config=config,
        norm=data.norm,
    )


def init_variables(config, model, x_example: np.ndarray, key: jax.Array) -> PyTree:
    variables = model.init(key, jnp.zeros((1, *x_example.shape), jnp.float32), train=False)
    variables = flax.core.unfreeze(variables)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


class PhaseRun(NamedTuple):
    """What the epochs of one phase need, built by `begin_phase`."""

    info: PhaseInfo
    ctx: PhaseContext
    model: Any
    train_epoch: Any  # train.make_train_epoch(...): one call runs up to an epoch's steps
    x: jax.Array  # the phase's training inputs, on the device
    y: jax.Array
    epochs: int
    num_train: int
    steps_per_epoch: int


def begin_phase(
    config,
    method: Method,
    data: RunData,
    protocol: Protocol,
    phase: int,
    carried: PhaseResult | None,
    method_state: dict,
    programs: capacity.Programs | None = None,
) -> tuple[PhaseRun, train.TrainState, dict]:
    """Widens the model, runs the method's `begin_phase` and builds the phase's jitted epoch.

    Under `head.capacity` the epoch comes from `programs` (one for the run) when it already holds
    it, so that every phase runs the same compiled program.
    """
    info = PhaseInfo(phase, protocol.offsets[phase], protocol.phase_sizes[phase])
    phase_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), phase)
    wide = config.head.capacity
    programs = programs or capacity.Programs()
    model = phase_model(config, method, info)
    dtype = DTYPES[config.dtype]
    ctx = make_context(config, data, info, model)
    if carried is None:
        narrow = phase_model(config, method, info, num_classes=info.num_seen)
        variables = init_variables(config, narrow, data.x_train[0], named_key(phase_key, "init"))
        variables = capacity.initial(variables, wide) if wide else variables
    else:
        variables = method.grow(ctx, carried.variables, named_key(phase_key, "grow"))
        widen_fn = lambda v: widen(config, v, ctx, named_key(phase_key, "widen"))  # noqa: E731
        variables = capacity.add_classes(variables, info, widen_fn) if wide else widen_fn(variables)
    method_state = method.begin_phase(ctx, variables, method_state)

    idx = method.train_indices(ctx, method_state)
    if len(idx) == 0:
        raise ValueError(f"Phase {phase} has no training examples; check the dataset and protocol.")
    batch_size = config.train.batch_size
    steps_per_epoch = -(-len(idx) // batch_size)
    mesh = parallel.make_mesh(config.parallel.devices)
    hp = train.phase_hparams(config, phase)
    setup = method.setup(info)
    tx = train.make_optimizer(
        config.train,
        hp,
        steps_per_epoch,
        variables["params"],
        setup,
        info.num_old,
        dynamic=bool(wide),
    )
    opt_state = tx.init(variables["params"])
    if carried is not None and config.train.carry_opt_state:
        num_new = 0 if wide else info.num_new  # a wide head's new columns have zero moments
        opt_state = train.carry_opt_state(carried.opt_state, opt_state, num_new) or opt_state
    state = train.TrainState(
        variables["params"],
        variables["batch_stats"],
        opt_state,
        named_key(phase_key, "train"),
        jnp.zeros((), jnp.int32),
    )
    augment = config.augment if data.is_image else {"crop_padding": 0, "flip": False}
    stream = None
    if config.dataset.stream:
        if jax.process_count() > 1:
            raise ValueError(
                "dataset.stream does not feed several processes yet; run one process per host "
                "with parallel.coordinator unset, or keep the data on the device (stream=False)."
            )
        stream = StreamingBatches(
            (data.x_train, data.y_train),
            idx,
            batch_size,
            sharding=parallel.batch_sharding(mesh) if mesh.size > 1 else None,
        )

    def build_epoch():
        return train.make_train_epoch(
            model=model,
            tx=tx,
            method=method,
            info=None if wide else info,
            setup=setup,
            norm=data.norm,
            batch_size=batch_size,
            crop_padding=augment["crop_padding"],
            flip=augment["flip"],
            dtype=dtype,
            steps_per_call=config.checkpoint.every_steps or None,
            loop="stream" if config.dataset.stream else train_loop(config),
            batch_sharding=parallel.batch_sharding(mesh) if mesh.size > 1 else None,
            stream=stream,
            hyperparams=train.phase_hyperparams(config) if wide else None,
        )

    state, method_state = parallel.replicate((state, method_state), mesh)
    if config.parallel.shard_params:
        large = (state.params, state.opt_state)
        large = parallel.shard_large(large, mesh, config.parallel.shard_min_size)
        state = state._replace(params=large[0], opt_state=large[1])
    args = None
    if wide:  # the whole training set, once for the run, and the phase's rows of it
        # One program per distinct setup (a method may freeze the backbone after phase 0, say);
        # a tx that freezes the old columns depends on their number too.
        key = ("train", setup, info.num_old if setup.freeze_old_columns else None)
        epoch_fn = programs.get(key, build_epoch)
        x_dev, y_dev = programs.get(
            "train_data", lambda: parallel.replicate((data.x_train, data.y_train), mesh)
        )
        args = parallel.replicate(capacity.phase_args(info, idx, len(data.x_train)), mesh)
    else:
        epoch_fn = build_epoch()
        if stream is None:
            x_dev, y_dev = parallel.replicate((data.x_train[idx], data.y_train[idx]), mesh)
        else:
            x_dev = y_dev = None  # batches come from the host, one at a time
    epochs = hp.epochs if setup.train else 0
    train_epoch = bind_epoch(epoch_fn, method, args)
    return (
        PhaseRun(info, ctx, model, train_epoch, x_dev, y_dev, epochs, len(idx), steps_per_epoch),
        state,
        method_state,
    )


def bind_epoch(epoch_fn, method: Method, args: train.PhaseArgs | None):
    """`train_epoch(state, method_state, x, y)` over `epoch_fn`, passing the jitted step only the
    method's `train_keys` (the rest of the method state is returned as it was) and `args`."""

    def train_epoch(state, method_state, x, y):
        part = base.select_state(method_state, method.train_keys)
        extra = () if args is None else (args,)
        state, part, metrics = epoch_fn(state, part, x, y, *extra)
        return state, {**method_state, **part}, metrics

    return train_epoch


def finish_phase(
    config,
    method: Method,
    data: RunData,
    protocol: Protocol,
    run: PhaseRun,
    state: train.TrainState,
    method_state: dict,
    metrics: dict,
    train_seconds: float,
    programs: capacity.Programs | None = None,
) -> PhaseResult:
    """Runs the method's `end_phase`, evaluates, and returns the phase's results record."""
    start = time.perf_counter()
    info = run.info
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    variables, method_state = method.compress(run.ctx, variables, method_state)
    model, ctx, opt_state = run.model, run.ctx, state.opt_state
    final = phase_model(config, method, info, final=True)
    if final != model:
        model, ctx = final, make_context(config, data, info, final)
    if jax.tree.structure(variables["params"]) != jax.tree.structure(state.params):
        tx = train.make_optimizer(
            config.train,
            train.phase_hparams(config, info.phase),
            run.steps_per_epoch,
            variables["params"],
            method.setup(info),
            info.num_old,
            dynamic=bool(config.head.capacity),
        )
        opt_state = tx.init(variables["params"])  # the trained one fits other params
    method_state = method.end_phase(ctx, variables, method_state)
    train_seconds += time.perf_counter() - start
    start = time.perf_counter()
    row = evaluate_phase(
        config, model, method, data, protocol, info.phase, variables, method_state, programs
    )
    record = {
        "phase": info.phase,
        "classes": [int(c) for c in protocol.class_order[info.num_old : info.num_seen]],
        "num_seen": info.num_seen,
        "num_train_examples": run.num_train,
        "num_params": surgery.count_params(variables["params"], depth=1),
        "epochs": run.epochs,
        "final_loss": float(metrics["loss"]) if metrics else None,
        "final_train_accuracy": float(metrics["accuracy"]) if metrics else None,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
        **row,
    }
    return PhaseResult(variables, opt_state, method_state, record)


def train_phase(
    config,
    method: Method,
    data: RunData,
    protocol: Protocol,
    phase: int,
    carried: PhaseResult | None,
    method_state: dict,
    progress: report.Progress | None = None,
) -> PhaseResult:
    """One whole phase without checkpoints (for notebooks and tests): begin, epochs, finish."""
    start = time.perf_counter()
    pr, state, method_state = begin_phase(
        config, method, data, protocol, phase, carried, method_state
    )
    steps = Steps(pr)
    while steps.remaining(state):
        state, method_state, metrics = pr.train_epoch(state, method_state, pr.x, pr.y)
        steps.add(metrics)
    args = (pr, state, method_state, steps.last_epoch, time.perf_counter() - start)
    return finish_phase(config, method, data, protocol, *args)


class Steps:
    """Counts a phase's steps as the calls of `train_epoch` return, and averages each epoch's metrics.

    An epoch's mean is exactly rounded (`math.fsum`) over its steps, so it does not depend on how
    the epoch was split into calls; the values of an epoch that a checkpoint splits are carried in
    the checkpoint (`state_dict`), so a resumed run reports the same means as an uninterrupted one.
    """

    def __init__(self, pr: PhaseRun, saved: dict | None = None):
        self.phase, self.per_epoch = pr.info.phase, pr.steps_per_epoch
        self.total = pr.epochs * pr.steps_per_epoch
        saved = saved or {}
        self.step = int(saved.get("step", 0))
        self.values = {k: list(v) for k, v in saved.get("values", {}).items()}
        self.last_epoch = dict(saved.get("last_epoch", {}))  # the last finished epoch's means

    def remaining(self, state: train.TrainState) -> bool:
        step = int(parallel.to_host(state.step))
        if step != self.step:
            raise ValueError(f"The train state is at step {step}, expected {self.step}.")
        return self.step < self.total

    def add(self, metrics: dict) -> bool:
        """Takes one call's metrics; returns whether it ended an epoch (its means: `last_epoch`)."""
        metrics = parallel.to_host(metrics)
        n = int(metrics.pop("steps"))
        loss = np.asarray(metrics["loss"])[:n]
        if not np.isfinite(loss).all():
            raise FloatingPointError(
                f"Non-finite loss {loss[~np.isfinite(loss)][0]} in phase {self.phase}, epoch "
                f"{self.step // self.per_epoch}, steps {self.step}-{self.step + n - 1}; lower the "
                "learning rate or check the data. Checkpoints saved before it are kept."
            )
        self.step += n
        for key, value in metrics.items():
            self.values.setdefault(key, []).extend(float(v) for v in np.asarray(value)[:n])
        if self.step % self.per_epoch:
            return False
        self.last_epoch = {k: math.fsum(v) / len(v) for k, v in self.values.items()}
        self.values = {}
        return True

    @property
    def epoch(self) -> int:
        """Epochs finished so far."""
        return self.step // self.per_epoch

    def state_dict(self) -> dict:
        return {"step": self.step, "values": self.values, "last_epoch": self.last_epoch}


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


def evaluate_phase(
    config, model, method, data, protocol, phase, variables, method_state, programs=None
) -> dict:
    """Scores the test data of every seen class and returns the phase's rows of the matrices.

    The method's extra classifiers (e.g. nearest-mean) are evaluated the same way, under `extra`.
    Under `head.capacity` the whole test set is scored, a shape that does not change with the
    phase, with the classes not seen yet masked, by functions kept in `programs` for later phases.
    """
    num_seen = protocol.num_seen(phase)
    seen = data.y_test < num_seen
    wide = bool(config.head.capacity)
    programs = programs or capacity.Programs()
    eval_state = base.select_state(method_state, method.eval_keys)
    dtype = DTYPES[config.dtype]

    def rows(name, predict_fn):
        build = lambda: train.make_apply_batches(model, data.norm, predict_fn, dtype, mask=wide)  # noqa: E731
        apply = programs.get(("eval", name), build) if wide else build()
        x = data.x_test if wide else data.x_test[seen]
        extra = (num_seen,) if wide else ()
        bs = config.eval.batch_size
        scores = train.run_batched(apply, variables, eval_state, x, bs, *extra)
        scores = scores[seen] if wide else scores
        return evaluate.evaluate_phase(scores, data.y_test[seen], protocol, phase)

    row = rows("predict", method.predict)
    extra = {name: rows(name, fn) for name, fn in method.extra_predictions().items()}
    return {**row, "extra": extra} if extra else row


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
        **extra_results(records),
        "phases": [
            {k: v for k, v in r.items() if k not in ("row", "task_aware_row", "extra")}
            for r in records
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
    model = phase_model(config, method, info, final=True)
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(lambda: init_variables(config, model, data.x_train[0], key))
    hp = train.phase_hparams(config, phase)
    tx = train.make_optimizer(
        config.train,
        hp,
        1,
        variables["params"],
        method.setup(info),
        info.num_old,
        dynamic=bool(config.head.capacity),
    )
    opt_state = jax.eval_shape(tx.init, variables["params"])
    return {**variables, "opt_state": opt_state, "rng": jax.eval_shape(lambda: key)}


class Preempted(Exception):
    """Raised after a SIGTERM/SIGINT once the run has saved; re-running the same command resumes."""


class Preemption:
    """Turns SIGTERM and SIGINT into a request to save and stop after the current call of the step.

    A call runs `config.checkpoint.every_steps` steps when that is set, else to the epoch's end.

    A second signal interrupts at once (the checkpoints already complete stay valid).
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        report.console.print(
            f"{signal.Signals(signum).name}: finishing the current steps, saving, then stopping "
            "(signal again to stop at once)."
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def validate(config, workdir: str) -> tuple[RunData, Protocol, Method]:
    """Checks every input that can be checked before anything is written or trained."""
    method = methods.build(config.method, config.method_args, config.memory)
    for name, value, valid in (
        ("model.name", config.model.name, tuple(MODELS)),
        ("train.optimizer", config.train.optimizer, train.OPTIMIZERS),
        ("train.schedule", config.train.schedule, train.SCHEDULES),
        ("train.loop", config.train.loop, ("auto", *train.LOOPS)),
        ("dtype", config.dtype, tuple(DTYPES)),
        ("head.init", config.head.init, surgery.HEAD_INITS),
    ):
        if value not in valid:
            raise ValueError(f"Unknown {name} {value!r}; valid values: {', '.join(valid)}.")
    for key in ("batch_size",):
        if config.train[key] <= 0:
            raise ValueError(f"train.{key} must be positive, got {config.train[key]}.")
    parallel.check_batch(parallel.make_mesh(config.parallel.devices), config.train.batch_size)
    data, protocol, _ = load_data(config)
    if hasattr(method, "memory"):
        method.memory.per_class_count(protocol.num_classes)
    capacity.check(config, method, protocol.num_classes)
    check_model_fits(config, method, data)
    # The nearest existing directory on the path: `os.makedirs` creates the rest (`runs/...` on a
    # fresh checkout). Anything else that exists there (a file) blocks it.
    probe = os.path.abspath(workdir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ValueError(
            f"The work directory {workdir} cannot be written ({probe} is not a writable "
            "directory); pass a --workdir you can write to."
        )
    return data, protocol, method


def check_model_fits(config, method, data: RunData) -> None:
    """Fails early when the data's example shape does not suit the model."""
    model = phase_model(config, method, PhaseInfo(0, 0, 2))
    try:
        jax.eval_shape(
            lambda: model.init(
                jax.random.PRNGKey(0), jnp.zeros((1, *data.x_train.shape[1:])), train=False
            )
        )
    except Exception as error:  # noqa: BLE001 -- any shape failure gets the same advice
        raise ValueError(
            f"Model {config.model.name!r} cannot take examples of shape {data.x_train.shape[1:]} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). Convolutional models "
            "need (H, W, C) images; use model.name=mlp for feature vectors."
        ) from None


def resume(ckpts, config, method, protocol, data) -> tuple[int, PhaseResult | None, dict, list]:
    """The phase to start from and what the last finished phase left, from the work directory."""
    saved = ckpts.latest_meta()
    if saved is not None:
        diffs = checkpoint.config_diff(saved["config"], config.to_dict())
        if diffs:
            raise ValueError(
                f"The work directory {os.path.dirname(ckpts.directory)} holds a run with a "
                "different config; resume it with the same config or pick a new --workdir. "
                "Differences:\n  " + "\n  ".join(diffs)
            )
    found = ckpts.restore_latest_phase(
        lambda phase: parallel.with_sharding(
            state_target(config, method, protocol, data, phase),
            parallel.make_mesh(config.parallel.devices),
        )
    )
    if found is None:
        return 0, None, method.init_state(), []
    last, state, method_state, meta = found
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    carried = PhaseResult(variables, state["opt_state"], method_state, meta["records"][-1])
    return last + 1, carried, method_state, meta["records"]


def _meta(config, protocol, phase, records, steps: dict | None = None) -> dict:
    meta = {
        "phase": phase,
        "steps": steps,  # within a phase: `Steps.state_dict()`; None at a phase's end
        "records": records,
        "config": config.to_dict(),
        "class_order": list(protocol.class_order),
    }
    return json.loads(json.dumps(meta, default=_json_default))


def run_epochs(
    config, ckpts, preempt, progress, protocol, records, pr: PhaseRun, state, method_state
):
    """The phase's steps, resuming after a within-phase checkpoint when there is one."""
    phase, saved = pr.info.phase, None
    restored = ckpts.restore_within(phase, state) if pr.epochs else None
    if restored is not None:
        state, method_state, meta = restored
        state = train.TrainState(*state) if not isinstance(state, train.TrainState) else state
        saved = meta["steps"]
        epoch = saved["step"] // pr.steps_per_epoch
        report.console.print(f"Resuming phase {phase} at step {saved['step']} (epoch {epoch}).")
    steps = Steps(pr, saved)
    every_steps, every_epochs = config.checkpoint.every_steps, config.checkpoint.every_epochs
    progress.start_epochs(phase, pr.epochs, start=steps.epoch)
    while steps.remaining(state):
        state, method_state, metrics = pr.train_epoch(state, method_state, pr.x, pr.y)
        if steps.add(metrics):
            progress.epoch_done(steps.last_epoch)
        if steps.step == steps.total:
            break  # the phase-end checkpoint follows
        epoch_end = steps.step % pr.steps_per_epoch == 0
        if (
            preempt.requested
            or every_steps
            or (epoch_end and every_epochs and steps.epoch % every_epochs == 0)
        ):
            meta = _meta(config, protocol, phase, records, steps.state_dict())
            ckpts.save_within(phase, steps.step, state, method_state, meta)
        if preempt.requested:
            ckpts.wait()
            raise Preempted(f"Stopped in phase {phase} at step {steps.step}, saved.")
    return state, method_state, steps.last_epoch


def run(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the phases of `config` in `workdir` and returns the results document.

    Args:
      config: the run's ConfigDict (see `incremental.config.base_config`).
      workdir: where results.json, the plot and the checkpoints go; a directory that already holds
        checkpoints of the same config is resumed where it stopped (after the last finished phase,
        or within a phase after the last saved step).
      stop_after: stop after this phase (a staged run; calling again resumes).

    Raises:
      Preempted: after SIGTERM/SIGINT, once the current steps are saved.
    """
    if config.seeds:
        from incremental import seeds  # noqa: PLC0415 -- seeds builds on this module

        return seeds.run_seeds(config, workdir)
    parallel.initialize(config)
    data, protocol, method = validate(config, workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"The work directory {workdir} cannot be created ({error.strerror}); pass a --workdir "
            "you can write to."
        ) from None
    compilation.use_cache(config.compile_cache)
    mesh = parallel.make_mesh(config.parallel.devices)
    ckpts = checkpoint.Checkpoints(workdir, config.checkpoint.keep)
    try:
        first, carried, method_state, records = resume(ckpts, config, method, protocol, data)
        main = parallel.is_main_process()  # the others train alongside and write no files
        progress = report.Progress(protocol, enabled=config.log.progress and main, start=first)
        results = results_from_records(config, protocol, records) if records else None
        last = (
            protocol.num_phases - 1
            if stop_after is None
            else min(stop_after, protocol.num_phases - 1)
        )
        programs = capacity.Programs()  # head.capacity: the programs every phase shares
        with Preemption() as preempt, progress:
            for phase in range(first, last + 1):
                start = time.perf_counter()
                with compilation.CompileTimer() as compiled:
                    pr, state, method_state = begin_phase(
                        config, method, data, protocol, phase, carried, method_state, programs
                    )
                    state, method_state, metrics = run_epochs(
                        config, ckpts, preempt, progress, protocol, records, pr, state, method_state
                    )
                    carried = finish_phase(
                        config,
                        method,
                        data,
                        protocol,
                        pr,
                        state,
                        method_state,
                        metrics,
                        time.perf_counter() - start,
                        programs,
                    )
                method_state = carried.method_state
                carried.record["compile_seconds"] = compiled.seconds  # inside train + eval seconds
                carried.record["compile_cache_hits"] = compiled.cache_hits
                records.append(carried.record)
                results = results_from_records(config, protocol, records)
                if main:
                    write_results(workdir, results)
                saved = {**carried.variables, "opt_state": carried.opt_state, "rng": state.rng}
                # Every array on the mesh: orbax saves arrays that span all processes, not ones
                # a hook computed on one.
                saved, method_state = parallel.replicate((saved, method_state), mesh)
                ckpts.save(phase, saved, method_state, _meta(config, protocol, phase, records))
                progress.phase_done(carried.record)
                if preempt.requested and phase < last:
                    raise Preempted(f"Stopped after phase {phase}, saved.")
    finally:
        ckpts.close()
    if config.log.plot and results is not None and parallel.is_main_process():
        report.plot(results, os.path.join(workdir, "accuracy.png"))
    return results

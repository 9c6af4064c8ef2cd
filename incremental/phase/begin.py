"""The begin stage: the previous phase's model grown and widened, the method's `begin_phase`, and
the phase's optimizer, train state and jitted epoch."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from incremental import capacity, evaluate, methods, online, parallel, surgery, train
from incremental.data import device
from incremental.methods import Method, PhaseContext, PhaseInfo, base
from incremental.phase import pretrained
from incremental.phase.context import make_context
from incremental.phase.load import RunData
from incremental.phase.model import (
    dtype_of,
    init_variables,
    named_key,
    phase_key,
    phase_model,
    train_loop,
)
from incremental.protocol import Protocol, scenario_of

if TYPE_CHECKING:  # grain, which streaming needs, is imported only when a run streams
    from incremental.data.stream import StreamingBatches

PyTree = Any


class Carried(NamedTuple):
    """What a finished phase hands to the next: its final variables, optimizer and method state."""

    variables: PyTree  # {'params': ..., 'batch_stats': ...}
    opt_state: Any
    method_state: dict


class PhaseRun(NamedTuple):
    """What the epochs of one phase need, built by `begin`."""

    info: PhaseInfo
    ctx: PhaseContext
    model: Any
    train_epoch: Any  # train.make_train_epoch(...): one call runs up to an epoch's steps
    x: jax.Array  # the phase's training inputs on the device (the whole set under head.capacity),
    y: jax.Array  # or None, when a stream of batches, x, feeds them (dataset.stream)
    epochs: int
    num_train: int
    steps_per_epoch: int
    args: train.PhaseArgs | None = None  # head.capacity: the phase's rows and counts
    # Phase 0 of the domain scenario: the initial model's accuracy on each phase's test data.
    init_row: list | None = None


def phase_info(protocol: Protocol, phase: int) -> PhaseInfo:
    return PhaseInfo(phase, protocol.offsets[phase], protocol.phase_sizes[phase])


def begin(
    config,
    method: Method,
    data: RunData,
    protocol: Protocol,
    phase: int,
    carried: Carried | None,
    method_state: dict,
    programs: capacity.Programs | None = None,
) -> tuple[PhaseRun, train.TrainState, dict]:
    """Widens the model, runs the method's `begin_phase` and builds the phase's jitted epoch.

    Under `head.capacity` the epoch comes from `programs` (one for the run) when it already holds
    it, so that every phase runs the same compiled program.
    """
    config = capacity.resolved(config, method, protocol.num_classes)
    info = phase_info(protocol, phase)
    programs = programs or capacity.Programs()
    model = phase_model(config, method, info)
    ctx = make_context(config, data, info, method)
    variables = start_variables(config, method, data, ctx, carried)
    init_row = random_init_row(config, data, protocol, model, variables) if not carried else None
    method_state = method.begin_phase(ctx, variables, method_state)

    idx = method.train_indices(ctx, method_state)
    if len(idx) == 0:
        raise ValueError(f"Phase {phase} has no training examples; check the dataset and protocol.")
    steps_per_epoch = -(-len(idx) // config.train.batch_size)
    hp = train.phase_hparams(config, phase)
    setup = phase_setup(config, method, protocol, info)
    tx = make_tx(config, method, info, steps_per_epoch, variables["params"])
    state = train_state(
        config, tx, variables, carried, info, named_key(phase_key(config, phase), "train")
    )
    mesh = parallel.make_mesh(config.parallel.devices)
    state, method_state = place_states(config, mesh, state, method_state)
    build = lambda stream=None: make_epoch(  # noqa: E731
        config, method, data, info, model, tx, mesh, stream, setup=setup
    )
    if capacity.width(config):  # the phase as PhaseArgs: rows of the whole set, the class counts
        # One program per distinct setup (a method may freeze the backbone after phase 0, say).
        epoch_fn = programs.get(("train", setup), build)
        hparams = train.phase_arrays(config, phase)
        args = capacity.phase_args(info, idx, len(data.x_train), hparams)
        args = parallel.replicate(args, mesh)
        if config.dataset.stream:  # the phase's host stream is the epoch's input
            x_dev, y_dev = stream_of(config, data, idx, mesh), None
        else:  # the whole training set on the device, once for the run
            x_dev, y_dev = programs.get(
                "train_data", lambda: parallel.replicate((data.x_train, data.y_train), mesh)
            )
    elif config.dataset.stream:  # batches come from the host, one at a time
        epoch_fn, x_dev, y_dev, args = build(stream_of(config, data, idx, mesh)), None, None, None
    else:
        epoch_fn, args = build(), None
        x_dev, y_dev = parallel.replicate((data.x_train[idx], data.y_train[idx]), mesh)
    epochs = hp.epochs if setup.train else 0
    train_epoch = bind_epoch(epoch_fn, method, args)
    pr = PhaseRun(
        info, ctx, model, train_epoch, x_dev, y_dev, epochs, len(idx), steps_per_epoch, args,
        init_row,
    )  # fmt: skip
    return pr, state, method_state


def place_states(config, mesh, state: train.TrainState, method_state: dict):
    """The train and method states on the devices of `mesh`: replicated, or with
    `parallel.shard_params` the large parameters and their optimizer state split over them."""
    state, method_state = parallel.replicate((state, method_state), mesh)
    if config.parallel.shard_params:
        large = parallel.shard_large(
            (state.params, state.opt_state), mesh, config.parallel.shard_min_size
        )
        state = state._replace(params=large[0], opt_state=large[1])
    return state, method_state


def random_init_row(config, data: RunData, protocol: Protocol, model, variables) -> list | None:
    """The accuracy of phase 0's initial model (the argmax of its logits) on each phase's test
    data, the baseline of forward transfer; None unless every phase can be scored before it is
    learned (the domain scenario's `RunData.test_arrival`)."""
    if data.test_arrival is None:
        return None
    fn = train.make_apply_batches(model, data.norm, lambda out, _: out.logits, dtype_of(config))
    scores = train.run_batched(fn, variables, {}, data.x_test, config.eval.batch_size)
    correct = scores.argmax(axis=1) == data.y_test
    return evaluate.by_phase(correct, data.test_arrival, range(protocol.num_phases))


def start_variables(config, method, data: RunData, ctx: PhaseContext, carried: Carried | None):
    """Phase 0's initial variables, or the previous phase's grown and widened for this one."""
    info, key = ctx.info, phase_key(config, ctx.info.phase)
    wide = capacity.width(config)
    if carried is None:
        narrow = phase_model(config, method, info, num_classes=info.num_seen)
        variables = init_variables(narrow, data.x_train[0], named_key(key, "init"))
        if config.model.get("pretrained"):  # a pre-trained backbone under the new head
            variables = pretrained.with_backbone(config, variables)
        if config.model.init_from:  # the classifier the user already has
            path = config.model.init_from
            variables = pretrained.fit(pretrained.read(path), variables, path)
        return capacity.initial(variables, wide) if wide else variables
    base = method.grow_from(carried.variables, carried.method_state)
    variables = method.grow(ctx, base, named_key(key, "grow"))
    widen_fn = lambda v: widen(config, method, v, ctx, named_key(key, "widen"))  # noqa: E731
    return capacity.add_classes(variables, info, widen_fn) if wide else widen_fn(variables)


def make_tx(config, method: Method, info: PhaseInfo, steps_per_epoch: int, params: PyTree):
    """The phase's optimizer for `params`."""
    return train.make_optimizer(
        config.train,
        train.phase_hparams(config, info.phase),
        steps_per_epoch,
        params,
        method.setup(info),
        info.num_old,
        dynamic=capacity.width(config) > 0,
    )


def train_state(config, tx, variables, carried: Carried | None, info: PhaseInfo, rng):
    """The phase's first train state; the optimizer's moments carried over if the config says so."""
    opt_state = tx.init(variables["params"])
    if carried is not None and config.train.carry_opt_state:
        # A wide head's new columns are zero already: nothing to append.
        num_new = 0 if capacity.width(config) else info.num_new
        opt_state = train.carry_opt_state(carried.opt_state, opt_state, num_new) or opt_state
    step = jnp.zeros((), jnp.int32)
    return train.TrainState(variables["params"], variables["batch_stats"], opt_state, rng, step)


def stream_of(config, data: RunData, idx: np.ndarray, mesh) -> StreamingBatches:
    from incremental.data.stream import StreamingBatches

    if jax.process_count() > 1:
        raise ValueError(
            "dataset.stream does not feed several processes yet; run one process per host "
            "with parallel.coordinator unset, or keep the data on the device (stream=False)."
        )
    sharding = parallel.batch_sharding(mesh) if mesh.size > 1 else None
    return StreamingBatches(
        (data.x_train, data.y_train), idx, config.train.batch_size, sharding=sharding
    )


def phase_setup(config, method: Method, protocol: Protocol, info: PhaseInfo) -> base.PhaseSetup:
    """The method's `setup` of the phase; in the task scenario with the protocol's class offsets,
    so that the loss sees each example's head block only (unless the method masks its own)."""
    setup = method.setup(info)
    if scenario_of(config) == "task" and method.task_masked_loss:
        setup = dataclasses.replace(setup, task_offsets=protocol.offsets)
    return setup


def make_epoch(config, method, data: RunData, info, model, tx, mesh, stream=None, *, setup=None):
    """The phase's jitted epoch (`train.make_train_epoch`) as the config asks for it, with `setup`
    (`phase_setup`; by default the method's)."""
    wide = capacity.width(config) > 0
    return train.make_train_epoch(
        model=model,
        tx=tx,
        method=method,
        info=None if wide else info,
        setup=setup or method.setup(info),
        norm=data.norm,
        batch_size=config.train.batch_size,
        augment=device.Augment.from_config(config.augment, data.is_image),
        dtype=dtype_of(config),
        steps_per_call=online.steps_per_call(config),
        loop="stream" if config.dataset.stream else train_loop(config),
        batch_sharding=parallel.batch_sharding(mesh) if mesh.size > 1 else None,
        stream=stream,
        hyperparams=train.phase_hyperparams(config) if wide else None,
    )


def bind_epoch(epoch_fn, method: Method, args: train.PhaseArgs | None):
    """`train_epoch(state, method_state, x, y)` over `epoch_fn`, passing the jitted step only the
    method's `train_keys` (the rest of the method state is returned as it was) and `args`, or the
    `phase_args` it is called with (another phase's, or stacked seeds' under `jax.vmap`)."""

    def train_epoch(state, method_state, x, y, phase_args=args):
        part = base.select_state(method_state, method.train_keys)
        extra = () if phase_args is None else (phase_args,)
        state, part, metrics = epoch_fn(state, part, x, y, *extra)
        return state, {**method_state, **part}, metrics

    return train_epoch


def widen(config, method: Method, variables: PyTree, ctx: PhaseContext, key: jax.Array) -> PyTree:
    """The previous phase's variables with head columns for this phase's new classes.

    The columns' init is `method.head_init(config.head.init)`; for 'imprint' the class means are of
    the features as the head sees them (L2-normalised first for a cosine head).
    """
    info = ctx.info
    init = method.head_init(config.head.init)
    class_means = None
    if init == "imprint" and info.num_new:  # a learned phase may bring no new classes
        idx = methods.base.data_of_classes(ctx.y_train, info.num_old, info.num_seen)
        feats = ctx.embed(variables, ctx.x_train[idx])
        if method.head == "cosine":
            feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        labels = ctx.y_train[idx] - info.num_old
        class_means = jnp.stack([feats[labels == c].mean(0) for c in range(info.num_new)])
    params = surgery.widen_head(
        variables["params"], info.num_new, key, init, class_means=class_means
    )
    return {"params": params, "batch_stats": variables["batch_stats"]}

"""The method interface: the few pure hooks in which class-incremental methods differ.

A method states only what differs from plain training. The phase loop calls, for each phase:

    backbone(make, info, final)               -> the phase's backbone (parallel branches, ...)
    grow(ctx, variables, key)                 -> the previous phase's variables, fitted to it
    setup(info)                               -> PhaseSetup: what is frozen, BatchNorm mode
    begin_phase(ctx, variables, method_state) -> method_state   (snapshot a teacher, ...)
    train_indices(ctx, method_state)          -> which training examples this phase trains on
    draw_memory(...) inside the jitted step   -> minibatches of a stream memory  (DER++, ER-ACE)
    loss(...)  inside the jitted step         -> per-example loss and metrics
    project_grads(...) inside the jitted step -> the gradient the optimizer gets  (A-GEM)
    step_update(...) inside the jitted step   -> method_state   (per-step bookkeeping, e.g. SI)
    observe(...) inside the jitted step       -> method_state   (a stream memory takes the batch)
    compress(ctx, variables, method_state)    -> (variables, method_state) of the final model
    end_phase(ctx, variables, method_state)   -> method_state   (select exemplars, calibrate, ...)
    predict(...) inside the jitted eval step  -> class scores

Method state is a dict of arrays (a pytree) so that it is checkpointed with everything else and can be
passed to jitted functions as an argument. Hyper-parameters are dataclass fields, filled from
`config.method_args`; a method instance is hashable and bound into jitted functions by closure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np

from incremental import models

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PhaseInfo:
    """Static facts about the phase being trained."""

    phase: int
    num_old: int  # classes learned before this phase
    num_new: int  # classes this phase introduces

    @property
    def num_seen(self) -> int:
        return self.num_old + self.num_new


@dataclasses.dataclass(frozen=True)
class PhaseSetup:
    """How a phase trains: freeze rules over parameter paths and the BatchNorm mode."""

    freeze: tuple[tuple[str, bool], ...] = ()  # (regex over 'backbone/...' paths, frozen)
    freeze_old_columns: bool = False  # keep the head columns of old classes fixed
    train_batch_norm: bool = True  # False: BatchNorm uses and keeps its running statistics
    train: bool = True  # False: no gradient steps this phase (closed-form methods)
    # The task scenario's class offsets (the protocol's): the loss sees each example's logits in its
    # phase's block [offsets[p], offsets[p + 1]) only, -inf elsewhere. (): one head for all classes.
    task_offsets: tuple[int, ...] = ()


class PhaseContext(NamedTuple):
    """Host-side inputs of the between-phase hooks."""

    info: PhaseInfo
    y_train: np.ndarray  # remapped labels of the whole training set
    x_train: np.ndarray  # the whole training set, host memory
    embed: Callable[[PyTree, np.ndarray], jax.Array]  # (variables, x) -> features, jitted
    # `apply_fn(variables, x, train=False) -> (features, logits)` for any head width, traceable.
    apply_fn: Callable | None = None
    # `normalize(x_raw) -> x`: the model's inputs from stored ones (jax arrays, traceable).
    normalize: Callable[[jax.Array], jax.Array] | None = None
    seed: int = 0  # the run's seed (config.seed), for host-side randomness of hooks
    config: Any = None  # the run's config, for hooks that read its settings (lr, batch size, ...)
    # `fit(variables, *, method, tx, epochs, method_state, rng, rows, name, backbone=None) ->
    # variables`: plain training of the phase's final model (or of the model with `backbone(make)`)
    # with another method's loss, for hooks that train on their own (a compression stage); built by
    # the loop (`phase.fit.make_fit`), so no method imports it.
    fit: Callable | None = None
    # The phase in which each training example arrives (`RunData.arrival`): its class's phase, or
    # the phase that brought it (`incremental learn`); None: its class's phase.
    arrival: np.ndarray | None = None


class Batch(NamedTuple):
    x: jax.Array  # preprocessed inputs
    y: jax.Array  # remapped labels
    weight: jax.Array  # 1 for real examples, 0 for the padding of the last batch
    # Minibatches the step drew from a stream memory (`Method.draw_memory`), by name, each with the
    # model's outputs on it from the batch's own forward pass; None for methods that draw none.
    memory: dict[str, MemoryBatch] | None = None


class Outputs(NamedTuple):
    features: jax.Array  # (B, D)
    logits: jax.Array  # (B, num_seen), or (B, head.capacity) with -inf from num_seen on


class MemoryBatch(NamedTuple):
    """A minibatch of a stream memory (`memory.draw`), drawn by `Method.draw_memory` in the step."""

    x: jax.Array  # stored inputs; the step augments and normalises them like the batch's
    y: jax.Array
    weight: jax.Array  # 1 for examples drawn, 0 where the memory held too few
    logits: jax.Array  # (B, W) the logits each example had when stored (DER++), 0 past logit_cols
    logit_cols: jax.Array  # (B,) how many classes the head had then
    out: Outputs | None = None  # the model's outputs on `x`, from the step's forward pass


@dataclasses.dataclass(frozen=True)
class Method:
    """Plain training with cross-entropy on all seen classes; methods override what differs."""

    name = "base"
    head = "linear"  # the model's head: linear | cosine (models.HEADS)
    # Why the method's maths needs new classes in every phase ("" if it does not): `incremental
    # learn` refuses a phase of known classes only with this reason (`learn_problem`), and the
    # validation the domain scenario, whose later phases are such phases (`scenario_problem`).
    needs_new_classes: ClassVar[str] = ""
    # The method-state entries the jitted hooks read: `loss` and `step_update` (train), `predict`
    # and `extra_predictions` (eval); None passes all of it. Every entry passed is part of the
    # jitted function's signature, so an entry only host-side hooks use whose shape changes every
    # phase (an exemplar memory) would recompile the step for nothing.
    train_keys: ClassVar[tuple[str, ...] | None] = None
    eval_keys: ClassVar[tuple[str, ...] | None] = None
    # True when the jitted hooks also work with a `PhaseInfo` of traced counts and logits for every
    # class, those not seen yet at -inf (as `loss` and `predict` here do): `head.capacity` may then
    # compile the train and eval steps once for the whole run.
    dynamic_phase: ClassVar[bool] = False
    # True when the backbone takes the phase being trained as an input of its call in training
    # (`phase=`: a Python int, or traced under `head.capacity`) instead of a field that would
    # make every phase's module, and so its program, another (the prompt methods' slices).
    phase_input: ClassVar[bool] = False
    # Why the method cannot learn online, one pass over each phase's stream (`protocol.online`),
    # "" if it can: the validation refuses the run with it (`{name}` is the method's name).
    not_online: ClassVar[str] = ""
    # Why the method cannot run the task scenario (`protocol.scenario='task'`: one head block per
    # phase, the task label given in training and at test), "" if it can (`scenario_problem`).
    not_task_incremental: ClassVar[str] = ""
    # In the task scenario the step masks each example's logits to its phase's block before `loss`
    # (`PhaseSetup.task_offsets`). False hands `loss` every seen class's logits, for a method whose
    # loss reads other blocks and masks its own classification term (LwF distils the old blocks).
    task_masked_loss: ClassVar[bool] = True
    # Whether the step forwards the `draw_memory` minibatches with the batch (their outputs in
    # `batch.memory`); False: they are only prepared, for `project_grads` (A-GEM).
    forward_memory: ClassVar[bool] = True

    def init_state(self) -> dict:
        """The method state before phase 0."""
        return {}

    def backbone(self, make: Callable[..., Any], info: PhaseInfo, *, final: bool = False):
        """The backbone of the phase's model; `make(part='all')` builds the config's backbone.

        `part` may be 'shallow' or 'deep' (`models.PARTS`) for backbones that split in two; other
        keyword arguments set backbone fields over the config's (`make(last_relu=False)`).
        `final=False` gives the model trained in the phase, `final=True` the one the phase ends
        with (evaluated, saved and carried into the next phase); they differ only for methods whose
        `compress` changes the model's shape.
        """
        del info, final
        return make()

    def head_init(self, configured: str) -> str:
        """How the new classes' head columns start (`surgery.HEAD_INITS`), given `head.init`."""
        return configured

    def grow_from(self, variables: PyTree, method_state: dict) -> PyTree:
        """What the next phase grows from, given the phase's final variables and method state.

        Default: the final variables. FOSTER, whose reported model is its two-branch teacher,
        grows the next phase from the compressed student kept in its method state.
        """
        del method_state
        return variables

    def grow(self, ctx: PhaseContext, variables: PyTree, key: jax.Array) -> PyTree:
        """The previous phase's final variables fitted to this phase's backbone (a new branch, ...).

        Runs at the start of every phase after the first, before the head gets the new classes'
        columns, on what `grow_from` gives; `ctx.embed` and `ctx.apply_fn` already apply this
        phase's model. Default: unchanged.
        """
        del ctx, key
        return variables

    def compress(
        self, ctx: PhaseContext, variables: PyTree, method_state: dict
    ) -> tuple[PyTree, dict]:
        """After the phase's training and before `end_phase`: the variables of the final model.

        Returns variables shaped for `backbone(..., final=True)` (e.g. FOSTER's distillation into
        one backbone, or dropping an auxiliary head). Default: unchanged.
        """
        del ctx
        return variables, method_state

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        del info
        return PhaseSetup()

    def begin_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        del ctx, variables
        return method_state

    def train_indices(self, ctx: PhaseContext, method_state: dict) -> np.ndarray:
        """Indices into the training set: by default the examples this phase brings (`phase_data`)."""
        del method_state
        return phase_data(ctx)

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        """Why the method cannot train a phase that brings `num_new` new classes (0: none) and, with
        `known`, more examples of classes learned before (`incremental learn`); None if it can.

        Default: it can (the phase trains on what it brings, with the method's loss), unless the
        class attribute `needs_new_classes` says why its maths needs new classes in every phase
        (`{name}` there is the method's name) and the phase has none."""
        del known
        if self.needs_new_classes and not num_new:
            return self.needs_new_classes.format(name=self.name)
        return None

    def scenario_problem(self, scenario: str) -> str | None:
        """Why the method cannot run `scenario` (`protocol.SCENARIOS`); None if it can.

        The one rule the validation applies: 'class' always runs; 'task' unless
        `not_task_incremental` says why; 'domain', whose later phases bring examples of known
        classes only, where the method can train such a phase (`learn_problem(0, known=True)`:
        `needs_new_classes` and the hyper-parameters decide)."""
        if scenario == "task":
            return self.not_task_incremental.format(name=self.name) or None
        if scenario == "domain":
            return self.learn_problem(0, True)
        return None

    def online_problem(self) -> str | None:
        """Why the method, with its hyper-parameters, cannot learn online; None if it can."""
        return self.not_online.format(name=self.name) or None

    def draw_memory(
        self, method_state: dict, key: jax.Array, batch_size: int
    ) -> dict[str, MemoryBatch]:
        """Inside the jitted step, before the loss: minibatches of a stream memory kept in the
        method state, by name (`memory.draw` with `key`); `batch_size` is the step's. The step
        augments, normalises and forwards them with the batch, and `loss` finds them, with their
        outputs, in `batch.memory`. Default: none."""
        del method_state, key, batch_size
        return {}

    def loss(
        self,
        out: Outputs,
        batch: Batch,
        *,
        params: PyTree,
        method_state: dict,
        info: PhaseInfo,
        apply_fn: Callable,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Per-example loss (B,) and per-example metrics; the step averages them over real examples.

        `apply_fn(variables, x, train=False)` applies the model with any head width, so a teacher
        (variables with fewer head columns, kept in `method_state`) can be evaluated on `batch.x`.
        """
        del params, method_state, info, apply_fn
        ce = models.cross_entropy(out.logits, batch.y)  # blocked, so head.capacity is exact
        return ce, {"ce": ce}

    def project_grads(
        self, grads: PyTree, *, grad_of: Callable[[Batch], PyTree], batch: Batch
    ) -> PyTree:
        """Inside the jitted step: the gradient the optimizer gets, from the loss's `grads` (A-GEM's
        projection). `grad_of(other)` is the gradient of the method's loss on another batch at the
        same parameters (computed only if called). Default: `grads`."""
        del grad_of, batch
        return grads

    def post_update(self, params: PyTree) -> PyTree:
        """A projection applied to the params after every optimizer step (e.g. WA's clipping)."""
        return params

    def step_update(
        self, method_state: dict, *, params_before: PyTree, params_after: PyTree, grads: PyTree
    ) -> dict:
        """Per-step bookkeeping inside the jitted step (e.g. SI's path integral); default: none.

        `grads` are the gradients of the total loss (with the method's terms) before the optimizer.
        """
        del params_before, params_after, grads
        return method_state

    def observe(
        self, method_state: dict, batch: Batch, *, logits: jax.Array, key: jax.Array
    ) -> dict:
        """Inside the jitted step, after the update: what the method keeps of the batch (a stream
        memory's reservoir update). `batch.x` are the stored inputs, before augmentation;
        `logits` the batch's from the forward pass before the update, -inf for classes not seen
        yet (`head.capacity`). Default: nothing."""
        del batch, logits, key
        return method_state

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        del ctx, variables
        return method_state

    def extra_predictions(self) -> dict[str, Callable[[Outputs, dict], jax.Array]]:
        """Other classifiers to evaluate beside `predict`, by name (e.g. `{"nme": ...}`).

        Each is evaluated like `predict` and reported under `<name>_...` keys in results.json.
        """
        return {}

    def companions(
        self, info: PhaseInfo, variables: PyTree, method_state: dict
    ) -> dict[str, tuple[Callable[..., Any], PyTree]]:
        """Other models the phase reports beside its final one, by name: `(backbone, variables)`.

        `backbone(make)` builds the companion's backbone as `backbone` does; its head is the final
        model's kind over `info.num_seen` classes. Each is scored with `predict` and reported under
        `<name>_...` keys, like `extra_predictions` (FOSTER's student beside its teacher). Every
        phase must return the same names. Default: none.
        """
        del info, variables, method_state
        return {}

    def predict(self, out: Outputs, method_state: dict) -> jax.Array:
        """Class scores (B, num_seen); the argmax is the prediction."""
        del method_state
        return out.logits


def select_state(method_state: dict, keys: tuple[str, ...] | None) -> dict:
    """The entries `keys` of `method_state` (a method's `train_keys` or `eval_keys`); None: all."""
    return method_state if keys is None else {k: method_state[k] for k in keys if k in method_state}


def phase_data(ctx: PhaseContext, *, so_far: bool = False) -> np.ndarray:
    """Indices of the training examples that arrive in this phase (`PhaseContext.arrival`): the
    examples of its new classes, and in a learned phase every example its source brought, of known
    classes too; with `so_far`, of every phase up to this one."""
    info = ctx.info
    if ctx.arrival is None:
        return data_of_classes(ctx.y_train, 0 if so_far else info.num_old, info.num_seen)
    return np.flatnonzero(ctx.arrival <= info.phase if so_far else ctx.arrival == info.phase)


def new_logits_problem(num_new: int, key: str, value: str) -> str | None:
    """`Method.learn_problem` of a method whose cross-entropy is over the new classes' logits only
    when `method_args.<key>` is 'new'."""
    if num_new or value != "new":
        return None
    return (
        f"with method_args.{key}='new' its cross-entropy is over the new classes' logits only, and "
        f"the phase has none; pass --config.method_args.{key}=seen."
    )


def task_block_start(ctx: PhaseContext) -> int:
    """Where the phase's head block starts in the task scenario (`ctx.info.num_old`: the phase's
    examples' likelihood is over their block, for importances estimated on it), else 0."""
    config = ctx.config
    if config is None or config.protocol.get("scenario", "class") != "task":
        return 0
    return ctx.info.num_old


def data_of_classes(y: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Indices of the examples whose remapped label is in [lo, hi)."""
    return np.flatnonzero((y >= lo) & (y < hi))


# The classification loss of methods that offer the choice (`loss_classes`): over every seen class's
# logit (the papers'), or over the new classes' only (PyCIL's finetune and EWC, FACIL).
LOSS_CLASSES = ("seen", "new")


def check_choice(key: str, value: Any, valid: tuple) -> None:
    """Raises a ValueError naming `method_args.<key>` when `value` is not one of `valid`."""
    if value not in valid:
        raise ValueError(f"method_args.{key} must be one of {valid}, got {value!r}.")


def static_first_phase(info: PhaseInfo) -> bool:
    """True when `info` is phase 0 as a Python number; under `head.capacity` the phase is traced and
    one program serves phase 0 and the later ones, so a hook can skip work only where this holds."""
    return isinstance(info.phase, int) and info.phase == 0


def classified_logits(logits: jax.Array, num_old: int | jax.Array, loss_classes: str) -> jax.Array:
    """The logits a `loss_classes` cross-entropy sees: all of them, or the old columns at -inf.

    With 'new', the cross-entropy equals PyCIL's `F.cross_entropy(logits[:, known:], y - known)`
    (models/finetune.py line 153, models/ewc.py line 172, at 87cc411) for labels of new classes.
    """
    return models.mask_old(logits, num_old) if loss_classes == "new" else logits


def train_kwargs(method: Method, info: PhaseInfo) -> dict[str, Any]:
    """What a training forward pass gives the backbone besides the inputs: the phase, for a
    method whose backbone takes it (`Method.phase_input`)."""
    return {"phase": info.phase} if method.phase_input else {}

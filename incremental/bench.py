"""Throughput benchmark of the library's jitted train epoch and evaluation, on synthetic data.

    python scripts/benchmark.py                 # mlp, wide_mlp, resnet32, vit_b16 -> table + JSON
    python -m incremental.bench --models=wide_mlp --epochs=5 --json=runs/wide.json
    python scripts/benchmark.py --quick                  # two tiny MLPs, a few seconds

For each model it measures train and eval images/s, the compile time of the functions a phase
compiles, one train step timed alone against the epoch (one `lax.scan` over device-resident data,
so the difference is the input pipeline's and the loop's overhead), host-device transfers per
epoch, and the achieved FLOP/s as a fraction of a matmul timed by the same process in the model's
compute dtype (float32; bfloat16 for ViT-B/16 at 224 px, as configs/vit_cifar100.py). For
ResNet-32 it also times the 3x3 convolutions of each stage and their two gradients alone. It prints
a line as it starts and finishes each measurement: a CPU compile can take minutes.

The fraction of the matmul peak is `achieved / peak`:

- achieved = FLOPs per train step (XLA's cost analysis of the compiled step; the analytic count of
  `mlp_flops` where XLA gives none) * steps per epoch / the median of the timed epochs;
- peak = the highest of the matmul samples taken alongside that model's epochs: one right before
  each timed epoch and one after the last, each the best of `--matmul_repeats` calls of a
  `--matmul_size` square matmul of the model's compute dtype compiled once.

Other work on the machine then slows the peak and the epochs alike, instead of lowering the
reference alone as a peak timed once, apart from the models, could. ResNet-32's conv rows are each
against the highest of a sample before and one after that row. Every sample is in the JSON
(`matmul.samples`, each model's and conv row's `matmul_peak_samples`). A fraction that still comes
out above 1 (the load changed within the samples, or the matmul is too small to reach the
machine's peak) is shown as measured and marked `*` with a note, not clipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich import box
from rich.console import Console
from rich.table import Table

from incremental import methods, models, report, train
from incremental.config import base_config
from incremental.data import device
from incremental.methods import Batch, Outputs, PhaseInfo
from incremental.methods.base import train_kwargs


class Spec(NamedTuple):
    """One benchmarked model: the backbone, its inputs and the batch size."""

    model: str  # a key of models.MODELS
    kwargs: dict[str, Any]  # backbone fields
    input_shape: tuple[int, ...]  # one stored example, uint8
    num_classes: int
    batch_size: int
    num_examples: int  # examples per epoch (the last batch is padded as in training)


SPECS: dict[str, Spec] = {
    # The digits default: 8x8 images, one hidden layer of 256, 1,437 training examples.
    "mlp": Spec("mlp", {"hidden": (256,)}, (8, 8, 1), 10, 64, 1437),
    "wide_mlp": Spec("mlp", {"hidden": (2048, 2048)}, (8, 8, 1), 10, 512, 8 * 512),
    # Two batches: on CPU each step of the epoch's scan takes tens of seconds (see conv_breakdown).
    "resnet32": Spec("resnet32", {}, (32, 32, 3), 100, 128, 2 * 128),
    # configs/vit_cifar100.py's backbone: ViT-B/16 on 224-px images, in its bfloat16 compute (its
    # fraction is of a bfloat16 matmul's peak). Two batches: on CPU a step takes tens of seconds.
    "vit_b16": Spec(
        "vit", {"size": "b", "patch": 16, "dtype": "bfloat16"}, (224, 224, 3), 100, 32, 64
    ),
}
# `--quick`: the same code paths at sizes whose compiles and timings take seconds (tests, a first
# look). ResNet is not run by default there (its compiles alone take tens of seconds on CPU).
QUICK_SPECS: dict[str, Spec] = {
    "mlp": Spec("mlp", {"hidden": (32,)}, (8, 8, 1), 10, 16, 40),
    "wide_mlp": Spec("mlp", {"hidden": (128, 128)}, (8, 8, 1), 10, 32, 64),
    "resnet32": Spec("resnet32", {"depth": 8}, (16, 16, 3), 10, 8, 16),
    # ViT-Ti's width and heads, one block, 4 patches of 8 px: the ViT-B/16 row's code paths.
    "vit_b16": Spec(
        "vit", {"size": "ti", "depth": 1, "patch": 8, "dtype": "bfloat16"}, (16, 16, 3), 10, 8, 16
    ),
}


class Defaults(NamedTuple):
    """The command line's defaults of one mode."""

    models: str
    epochs: int
    step_repeats: int
    matmul_size: int
    matmul_repeats: int


DEFAULTS = Defaults(
    "mlp,wide_mlp,resnet32,vit_b16", epochs=2, step_repeats=5, matmul_size=2048, matmul_repeats=3
)
QUICK_DEFAULTS = Defaults(
    "mlp,wide_mlp", epochs=2, step_repeats=2, matmul_size=512, matmul_repeats=2
)


def say(message: str) -> None:
    """One progress line, written at once."""
    report.console.print(message, markup=False, highlight=False, soft_wrap=True)


def mlp_flops(
    input_dim: int, hidden: Sequence[int], num_classes: int, batch_size: int
) -> dict[str, int]:
    """Analytic multiply-add FLOPs (2 per MAC) of an MLP with a linear head, per batch.

    Forward: 2 * batch * sum(in * out) over the layers. A train step adds the weight gradients
    (the same again) and the input gradients of every layer but the first (the data needs none).
    Bias adds, activations and the optimizer are not counted.
    """
    dims = [input_dim, *(int(w) for w in hidden), num_classes]
    macs = [a * b for a, b in zip(dims[:-1], dims[1:], strict=True)]
    forward = 2 * batch_size * sum(macs)
    return {"forward": forward, "train": 3 * forward - 2 * batch_size * macs[0]}


def _xla_flops(compiled) -> float | None:
    """FLOPs from XLA's cost analysis of a compiled function (a dict, or a list of them in older JAX)."""
    costs = compiled.cost_analysis()
    if isinstance(costs, list | tuple):
        costs = costs[0] if costs else {}
    flops = (costs or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _call_times(
    fn: Callable, args: Sequence[Any], repeats: int, warmup: bool = True
) -> list[float]:
    """Wall times of `repeats` calls of `fn(*args)`, each waited for, after one warm-up call."""
    if warmup:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def _timed_compile(jitted: Callable, *args) -> tuple[Any, float]:
    """`jitted.lower(*args).compile()` and the seconds it took (tracing included)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


class PeakMeter:
    """A square matmul (float32, or the dtype of the models it is the peak of) compiled once and
    timed on demand: the reference peak.

    Each `sample()` is the FLOP/s of the best of `repeats` calls; all are kept, in order, so the
    results show which samples each model's fraction was taken against.
    """

    def __init__(self, size: int, repeats: int, dtype: str = "float32"):
        if size < 1 or repeats < 1:
            raise ValueError(
                f"--matmul_size and --matmul_repeats must be at least 1, got {size}, {repeats}."
            )
        rng = np.random.default_rng(0)
        # Host-made inputs: eager jax.random would compile several programs first.
        self.args = jax.device_put(
            tuple(
                rng.standard_normal((size, size), dtype=np.float32).astype(jnp.dtype(dtype))
                for _ in range(2)
            )
        )
        self.size, self.repeats, self.dtype, self.samples = size, repeats, dtype, []
        self.matmul = jax.jit(jnp.matmul).lower(*self.args).compile()
        jax.block_until_ready(self.matmul(*self.args))  # allocates and warms up; not a sample

    def sample(self) -> float:
        """The peak FLOP/s now: the best of `repeats` calls."""
        best = min(_call_times(self.matmul, self.args, self.repeats, warmup=False))
        self.samples.append(2 * self.size**3 / best)
        return self.samples[-1]

    def summary(self) -> dict[str, Any]:
        """The JSON record: the highest sample as `flops_per_s`, and every sample."""
        best = max(self.samples)
        return {
            "size": self.size,
            "dtype": self.dtype,
            "repeats": self.repeats,
            "seconds": 2 * self.size**3 / best,
            "flops_per_s": best,
            "samples": list(self.samples),
        }


def alternate(
    call: Callable[[], Any], repeats: int, meter: PeakMeter
) -> tuple[list[float], list[float]]:
    """Wall times of `repeats` calls of `call()`, with a peak sample before each and after the last.

    Returns (times, peak samples); there is one more sample than times.
    """
    peaks = [meter.sample()]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
        peaks.append(meter.sample())
    return times, peaks


class Bench(NamedTuple):
    """What one model's measurements need: the phase's pieces, device data and a train state."""

    model: Any
    tx: optax.GradientTransformation
    method: methods.Method
    info: PhaseInfo
    setup: methods.PhaseSetup
    norm: device.Normalizer
    x: jax.Array  # (num_examples, *input_shape) uint8, on the device
    y: jax.Array  # (num_examples,) int32, on the device
    state: train.TrainState


def build_bench(spec: Spec, seed: int = 0) -> Bench:
    """A phase-0 finetune setup with the digits config's optimizer, on random uint8 data."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (spec.num_examples, *spec.input_shape), dtype=np.uint8)
    y = rng.integers(0, spec.num_classes, (spec.num_examples,), dtype=np.int32)
    model = models.build_model(spec.model, spec.num_classes, **spec.kwargs)
    method = methods.build("finetune", {}, None)
    info = PhaseInfo(0, 0, spec.num_classes)
    setup = method.setup(info)
    config = base_config()
    steps = -(-spec.num_examples // spec.batch_size)
    hp = train.phase_hparams(config, 0)

    def init_state(tx: optax.GradientTransformation | None = None):
        # An `rbg` key: XLA:CPU compiles threefry's hash of every parameter's shape for seconds,
        # and the initial values do not change the timings.
        init_key = jax.random.key(seed, impl="rbg")
        variables = model.init(init_key, jnp.zeros((1, *spec.input_shape)), train=False)
        if tx is None:  # shapes for the optimizer, which needs the params' structure
            return variables["params"]
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        zero, train_key = jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed)
        return train.TrainState(params, batch_stats, tx.init(params), train_key, zero)

    params = jax.eval_shape(init_state)
    tx = train.make_optimizer(config.train, hp, steps, params, setup, 0)
    # One jitted program: run eagerly, init and tx.init compile one per operation (seconds).
    state = jax.jit(lambda: init_state(tx))()
    norm = device.fit_normalizer(x, is_image=True)
    return Bench(model, tx, method, info, setup, norm, *jax.device_put((x, y)), state)


def make_train_step(bench: Bench) -> Callable:
    """One step of `train.make_train_epoch`'s scan body as its own jitted function (no loop).

    `step(state, x_all, y_all, idx_B, weight_B) -> (state, loss)` gathers the batch from the
    device-resident arrays, normalises it, and takes the method's loss, gradient and update; it
    leaves out only the epoch's per-step key split and its accuracy metric, which cost little.
    """
    model, method, info = bench.model, bench.method, bench.info

    def loss_fn(params, batch_stats, batch):
        variables = {"params": params, "batch_stats": batch_stats}
        (feats, logits), updates = model.apply(
            variables, batch.x, train=True, mutable=["batch_stats"], **train_kwargs(method, info)
        )
        per_example, _ = method.loss(
            Outputs(feats, logits), batch, params=params, method_state={}, info=info,
            apply_fn=None,
        )  # fmt: skip
        loss = (per_example * batch.weight).sum() / batch.weight.sum()
        return loss, updates.get("batch_stats", batch_stats)

    def step(state, x_all, y_all, idx_B, weight_B):
        batch = Batch(device.normalize(x_all[idx_B], bench.norm), y_all[idx_B], weight_B)
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch
        )
        updates, opt_state = bench.tx.update(grads, state.opt_state, state.params)
        params = method.post_update(optax.apply_updates(state.params, updates))
        return state._replace(
            params=params, batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1
        ), loss

    return jax.jit(step, donate_argnames=("state",))


def guarded(fn: Callable, *args) -> tuple[Any, str]:
    """Runs `fn(*args)` under `jax.transfer_guard("disallow")`; returns its outputs and "" or the error.

    On a transfer the outputs are None and the message is the guard's: it stops at the first
    transfer, so how many there would have been is unknown.
    """
    try:
        with jax.transfer_guard("disallow"):
            return jax.block_until_ready(fn(*args)), ""
    except RuntimeError as error:  # jax.errors.JaxRuntimeError
        return None, str(error).splitlines()[0]


def time_epochs(epoch: Callable, bench: Bench, epochs: int, meter: PeakMeter) -> dict[str, Any]:
    """Times `epochs` calls of the compiled epoch, alternating with peak samples.

    The first call, under the transfer guard, is not timed: the first call of a compiled program
    also allocates its buffers and warms the caches (about 45 ms against 3 ms for the digits MLP's
    epoch here), so it is a warm-up, not a sample.
    """
    out, transfer_error = guarded(epoch, bench.state, {}, bench.x, bench.y)
    state = bench.state if out is None else out[0]

    def call():
        nonlocal state
        state, _, metrics = epoch(state, {}, bench.x, bench.y)
        return metrics

    times, peaks = alternate(call, epochs, meter)
    return {
        "epoch_s": float(np.median(times)),
        "epoch_times_s": times,
        "matmul_peak_samples": peaks,
        "transfers_per_epoch": None if transfer_error else 0,
        "transfer_error": transfer_error,
        "final_state": state,
    }


def time_step(name: str, bench: Bench, spec: Spec, state: train.TrainState, repeats: int) -> dict:
    """Compiles and times one step alone, on the first batch of a shuffled epoch."""
    # Shuffled on the host: `device.batch_indices` would compile threefry (seconds on CPU) for
    # positions that do not change the step's time. Padded as it pads a short epoch.
    order = np.random.default_rng(0).permutation(spec.num_examples)
    idx = np.resize(order, spec.batch_size).astype(np.int32)
    weight = (np.arange(spec.batch_size) < spec.num_examples).astype(np.float32)
    step_args = (bench.x, bench.y, *jax.device_put((idx, weight)))
    say(f"{name}: compiling one train step alone...")
    step, compile_s = _timed_compile(make_train_step(bench), state, *step_args)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        state, loss = step(state, *step_args)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times[1:]))
    say(f"{name}: step {step_s * 1e3:,.2f} ms (compiled in {compile_s:.1f} s; median of {repeats})")
    return {
        "compile_train_step_s": compile_s,
        "step_s": step_s,
        "flops_per_step_xla": _xla_flops(step),
        "final_state": state,
    }


def resolve_loop(loop: str, spec: Spec) -> str:
    """`auto` as the run resolves it (`run.train_loop`): steps for conv models on CPU, else scan."""
    if loop != "auto":
        return loop
    return "steps" if jax.default_backend() == "cpu" and spec.model != "mlp" else "scan"


def compile_epoch(name: str, bench: Bench, spec: Spec, loop: str) -> tuple[Callable, Bench, float]:
    """The train epoch ready to time, the bench with its state, and the compile's seconds.

    With `loop='steps'` (a Python loop over one jitted step) it runs one epoch, which compiles the
    step; the compile time is then that epoch's time less a later epoch's (see `measure_train`).
    """
    epoch_fn = train.make_train_epoch(
        model=bench.model, tx=bench.tx, method=bench.method, info=bench.info,
        setup=bench.setup, norm=bench.norm, batch_size=spec.batch_size, loop=loop,
    )  # fmt: skip
    if loop == "scan":
        say(f"{name}: compiling train epoch (loop=scan)...")
        epoch, compile_s = _timed_compile(epoch_fn, bench.state, {}, bench.x, bench.y)
        return epoch, bench, compile_s
    say(f"{name}: compiling train step and running a first epoch (loop={loop})...")
    start = time.perf_counter()
    state, _, _ = epoch_fn(bench.state, {}, bench.x, bench.y)
    jax.block_until_ready(state)
    return epoch_fn, bench._replace(state=state), time.perf_counter() - start


def measure_train(
    name: str,
    bench: Bench,
    spec: Spec,
    epochs: int,
    step_repeats: int,
    meter: PeakMeter,
    loop: str = "auto",
) -> dict[str, Any]:
    """Compiles and times the epoch and the step alone; checks the epoch for transfers."""
    loop = resolve_loop(loop, spec)
    epoch, bench, compile_s = compile_epoch(name, bench, spec, loop)
    say(f"{name}: timing {epochs} train epoch(s), each between two matmul peak samples...")
    epoch_m = time_epochs(epoch, bench, epochs, meter)
    if loop != "scan":
        compile_s = max(compile_s - epoch_m["epoch_s"], 0.0)
    say(
        f"{name}: train {_rate(spec.num_examples / epoch_m['epoch_s'])} img/s (compiled in "
        f"{compile_s:.1f} s; median of {epochs} epoch(s), {epoch_m['epoch_s'] * 1e3:,.1f} ms)"
    )
    step_m = time_step(name, bench, spec, epoch_m.pop("final_state"), step_repeats)
    return {"loop": loop, "compile_train_epoch_s": compile_s, **epoch_m, **step_m}


def measure_eval(
    name: str, bench: Bench, spec: Spec, state: train.TrainState, repeats: int
) -> dict[str, Any]:
    """Compiles and times `train.make_apply_batches` with the method's predict rule."""
    apply_batches = train.make_apply_batches(bench.model, bench.norm, bench.method.predict)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    batches, _ = device.padded_batches(np.asarray(bench.x), spec.batch_size)
    batches = jax.device_put(batches)
    say(f"{name}: compiling eval...")
    evaluate, compile_s = _timed_compile(apply_batches, variables, {}, batches)
    seconds = float(np.median(_call_times(evaluate, (variables, {}, batches), repeats)))
    say(
        f"{name}: eval {_rate(spec.num_examples / seconds)} img/s (compiled in {compile_s:.1f} s; "
        f"median of {repeats} pass(es))"
    )
    return {
        "compile_eval_s": compile_s,
        "eval_s": seconds,
        "eval_images_per_s": spec.num_examples / seconds,
    }


def analytic_flops(spec: Spec) -> dict[str, int] | None:
    """`mlp_flops` for MLP specs; None for other models (XLA's count is used for them)."""
    if spec.model != "mlp":
        return None
    return mlp_flops(
        math.prod(spec.input_shape), spec.kwargs["hidden"], spec.num_classes, spec.batch_size
    )


def summarise(spec: Spec, train_m: dict, eval_m: dict) -> dict[str, Any]:
    """Derived figures: images/s, the epoch's overhead over its steps, FLOP/s against the peak.

    The peak is the highest of the samples taken alongside the timed epochs (module docstring).
    """
    num_batches = -(-spec.num_examples // spec.batch_size)
    analytic = analytic_flops(spec)
    xla = train_m["flops_per_step_xla"]
    flops, source = (xla, "xla") if xla else (analytic and analytic["train"], "analytic")
    achieved = flops * num_batches / train_m["epoch_s"] if flops else None
    peak = max(train_m["matmul_peak_samples"])
    return {
        "train_images_per_s": spec.num_examples / train_m["epoch_s"],
        "steps_sum_s": num_batches * train_m["step_s"],
        "epoch_over_steps": train_m["epoch_s"] / (num_batches * train_m["step_s"]),
        "compile_per_phase_s": train_m["compile_train_epoch_s"] + eval_m["compile_eval_s"],
        "flops_per_step_analytic": analytic and analytic["train"],
        "flops_per_step": flops,
        "flops_source": source,
        "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak,
        "fraction_of_matmul_peak": achieved / peak if achieved else None,
    }


def above_peak(fraction: float | None) -> bool:
    """Whether a fraction of the peak is above 1: the load changed while it was measured."""
    return fraction is not None and fraction > 1.0


LOADED_NOTE = (
    "* above the matmul peak timed alongside it: the load on the machine changed within the "
    "timings (other work on its cores), or --matmul_size is too small to reach the peak; rerun "
    "on an idle machine, or with more --epochs."
)


def say_fraction(name: str, result: dict[str, Any]) -> None:
    """The progress line of a model's FLOP/s against its peak, flagged when above it."""
    fraction = result["fraction_of_matmul_peak"]
    if fraction is None:
        say(f"{name}: no FLOP count, so no fraction of the peak")
        return
    samples = len(result["matmul_peak_samples"])
    flag = " *" if above_peak(fraction) else ""
    say(
        f"{name}: {result['achieved_flops_per_s'] / 1e9:,.2f} GFLOP/s = {100 * fraction:.1f}% of "
        f"{result['matmul_peak_flops_per_s'] / 1e9:,.1f} GFLOP/s, the best of {samples} matmul "
        f"samples around its epochs{flag}"
    )
    if flag:
        say(LOADED_NOTE)


def conv_breakdown(
    batch_size: int, image_size: int, meter: PeakMeter, repeats: int = 3
) -> list[dict[str, Any]]:
    """Times a 3x3 stride-1 conv of each ResNet stage alone: forward, input and kernel gradients.

    Each of the three costs 2 * B * H * W * 9 * C * C FLOPs, so their rates compare directly
    with each other and with the matmul peak, sampled before and after each stage's timings. Each
    is timed on its own and inside a `lax.scan`, where the train epoch runs them.
    """
    rows = []
    for width, size in ((16, image_size), (32, image_size // 2), (64, image_size // 4)):
        peaks = [meter.sample()]
        row = _conv_row(batch_size, size, width, repeats)
        peaks.append(meter.sample())
        for name in _conv_ops():
            row[f"{name}_fraction_of_matmul_peak"] = row["flops"] / row[f"{name}_s"] / max(peaks)
        rows.append({**row, "matmul_peak_samples": peaks})
    return rows


def _conv_row(batch_size: int, size: int, width: int, repeats: int) -> dict[str, Any]:
    """The best times of one stage's conv and its gradients, alone and in a scan."""
    x_key, w_key = jax.random.split(jax.random.PRNGKey(width))
    x = jax.random.normal(x_key, (batch_size, size, size, width), jnp.float32)
    w = jax.random.normal(w_key, (3, 3, width, width), jnp.float32)
    flops = 2 * batch_size * size * size * 9 * width * width
    row = {"shape": f"{batch_size}x{size}x{size}x{width}", "flops": flops}
    for name, fn in _conv_ops().items():
        for suffix, op, calls in (("", fn, 1), ("_in_scan", _in_scan(fn, 2), 2)):
            compiled = jax.jit(op).lower(x, w).compile()
            row[f"{name}{suffix}_s"] = min(_call_times(compiled, (x, w), repeats)) / calls
    return row


def _in_scan(fn: Callable, length: int) -> Callable:
    """`fn(x, w)` evaluated `length` times in a `lax.scan` whose carry depends on each result."""

    def scanned(x, w):
        def body(carry, _):
            out = fn(x, w + carry)
            return carry + 0.0 * out.sum(), None  # uses the result, so the loop must compute it

        return jax.lax.scan(body, jnp.zeros((), w.dtype), None, length=length)[0]

    return scanned


def _conv_ops() -> dict[str, Callable]:
    """The forward conv of flax's nn.Conv (NHWC, HWIO, padding 1) and its two gradients."""

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    return {
        "forward": conv,
        "grad_input": lambda x, w: jax.grad(lambda x: conv(x, w).sum())(x),
        "grad_kernel": lambda x, w: jax.grad(lambda w: conv(x, w).sum())(w),
    }


def _describe(spec: Spec) -> str:
    """The spec in a few words, for the progress lines."""
    kwargs = ", ".join(f"{k}={v}" for k, v in spec.kwargs.items())
    return (
        f"{spec.model}({kwargs}), batch {spec.batch_size}, {spec.num_examples:,} examples of "
        f"{'x'.join(map(str, spec.input_shape))}"
    )


def benchmark_model(
    name: str,
    spec: Spec,
    *,
    epochs: int,
    step_repeats: int,
    meter: PeakMeter,
    loop: str = "auto",
) -> dict[str, Any]:
    """All measurements of one model, as a JSON-ready dict."""
    start = time.perf_counter()
    say(f"{name}: building {_describe(spec)}...")
    bench = build_bench(spec)
    train_m = measure_train(name, bench, spec, epochs, step_repeats, meter, loop)
    eval_m = measure_eval(name, bench, spec, train_m.pop("final_state"), epochs)
    result = {
        "model": spec.model,
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.kwargs.items()},
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "dtype": spec_dtype(spec),  # of the compute, and of the matmul of its peak
        "batch_size": spec.batch_size,
        "num_examples": spec.num_examples,
        "batches_per_epoch": -(-spec.num_examples // spec.batch_size),
        **train_m,
        **eval_m,
        **summarise(spec, train_m, eval_m),
    }
    say_fraction(name, result)
    if spec.model == "resnet32":
        say(f"{name}: timing one 3x3 conv per stage and its gradients, alone and in a scan...")
        result["convs"] = conv_breakdown(spec.batch_size, spec.input_shape[0], meter)
    say(f"{name}: done in {time.perf_counter() - start:.1f} s")
    return result


def resolve_specs(
    names: Sequence[str],
    *,
    quick: bool = False,
    batches_per_epoch: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Spec]:
    """The specs to run, by name; `batch_size` replaces every model's batch size (the dataset keeps
    its batches per epoch), and `batches_per_epoch` resizes every dataset to whole batches."""
    table = QUICK_SPECS if quick else SPECS
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise ValueError(f"Unknown model(s) {unknown} in --models; choose from {sorted(table)}.")
    if batches_per_epoch is not None and batches_per_epoch < 1:
        raise ValueError(f"--batches_per_epoch must be at least 1, got {batches_per_epoch}.")
    specs = {n: table[n] for n in names}
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {batch_size}.")
        specs = {
            n: s._replace(
                batch_size=batch_size,
                num_examples=-(-s.num_examples // s.batch_size) * batch_size,
            )
            for n, s in specs.items()
        }
    if batches_per_epoch:
        specs = {
            n: s._replace(num_examples=batches_per_epoch * s.batch_size) for n, s in specs.items()
        }
    return specs


def run(
    names: Sequence[str],
    *,
    epochs: int = DEFAULTS.epochs,
    step_repeats: int = DEFAULTS.step_repeats,
    batches_per_epoch: int | None = None,
    batch_size: int | None = None,
    matmul_size: int = DEFAULTS.matmul_size,
    matmul_repeats: int = DEFAULTS.matmul_repeats,
    quick: bool = False,
    loop: str = "auto",
) -> dict[str, Any]:
    """Runs the benchmark; returns the JSON-ready results (the machine, the peak, each model)."""
    if epochs < 1 or step_repeats < 1:
        raise ValueError(
            f"--epochs and --step_repeats must be at least 1, got {epochs}, {step_repeats}."
        )
    specs = resolve_specs(
        names, quick=quick, batches_per_epoch=batches_per_epoch, batch_size=batch_size
    )
    say(f"benchmark: {', '.join(specs)} on {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs)")
    meters: dict[str, PeakMeter] = {}
    for dtype in dict.fromkeys(["float32", *(spec_dtype(s) for s in specs.values())]):
        say(f"benchmark: compiling a {matmul_size}x{matmul_size} {dtype} matmul for the peak...")
        meters[dtype] = PeakMeter(matmul_size, matmul_repeats, dtype)
        say(
            f"benchmark: {dtype} matmul peak {meters[dtype].sample() / 1e9:,.1f} GFLOP/s; sampled "
            "again around each timing"
        )
    results = {
        name: benchmark_model(
            name,
            spec,
            epochs=epochs,
            step_repeats=step_repeats,
            meter=meters[spec_dtype(spec)],
            loop=loop,
        )  # fmt: skip
        for name, spec in specs.items()
    }
    out = {"machine": machine(), "matmul": meters.pop("float32").summary(), "models": results}
    return {**out, **{f"matmul_{dtype}": meter.summary() for dtype, meter in meters.items()}}


def spec_dtype(spec: Spec) -> str:
    """The compute dtype of a spec's backbone (its `dtype` field; float32 where it sets none), and
    of the matmul its fraction of the peak is taken against."""
    return str(jnp.dtype(spec.kwargs.get("dtype", "float32")))


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def _rate(images_per_s: float | None) -> str:
    """Images per second, whole, or to a tenth below 10 (ViT-B/16 trains at under 1 on a CPU)."""
    return _fmt(images_per_s, digits=0 if images_per_s is None or images_per_s >= 10 else 1)


def print_table(results: dict[str, Any]) -> None:
    """The models as one table, then ResNet-32's convolutions alone, then a note if any is above 1."""
    where = f"{results['machine']['device_kind']} ({results['machine']['cpu_count']} CPUs)"
    for key in [k for k in results if k.startswith("matmul")]:  # float32's, then other dtypes'
        peak = results[key]
        samples = peak["samples"]
        report.console.print(
            f"{peak.get('dtype', 'float32')} matmul {peak['size']}x{peak['size']}: "
            f"{min(samples) / 1e9:,.1f} to {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s over "
            f"{len(samples)} samples taken between the timings, on {where}",
            soft_wrap=True,
        )
    table = Table(box=box.SIMPLE_HEAD)
    columns = (
        "model", "batch", "train img/s", "eval img/s", "compile epoch s", "compile eval s",
        "step ms", "epoch s", "epoch/steps", "transfers", "GFLOP/step", "GFLOP/s", "peak GFLOP/s",
        "of peak",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, r in results["models"].items():
        table.add_row(*_model_row(name, r))
    _wide_console().print(table)
    for name, r in results["models"].items():
        if "convs" in r:
            _wide_console().print(_conv_table(name, r["convs"]))
    if _any_above_peak(results):
        say(LOADED_NOTE)


def _any_above_peak(results: dict[str, Any]) -> bool:
    """Whether any model's or conv's fraction of the peak is above 1."""
    fractions = [r["fraction_of_matmul_peak"] for r in results["models"].values()]
    for r in results["models"].values():
        for row in r.get("convs", []):
            fractions += [row[f"{op}_fraction_of_matmul_peak"] for op in _conv_ops()]
    return any(above_peak(f) for f in fractions)


def _wide_console() -> Console:
    """The report console on a terminal; a wide one for pipes and files (rich assumes 80 there)."""
    if report.console.is_terminal:
        return report.console
    return Console(highlight=False, width=200)


def _percent(fraction: float | None, digits: int = 1) -> str:
    """A fraction of the peak as a percentage, with `*` when above 1 (see LOADED_NOTE)."""
    return f"{_fmt(fraction, 100, digits)}%{'*' if above_peak(fraction) else ''}"


def _model_row(name: str, r: dict[str, Any]) -> list[str]:
    flops = f"{_fmt(r['flops_per_step'], 1e-9, 2)} ({r['flops_source']})"
    transfers = "?" if r["transfers_per_epoch"] is None else str(r["transfers_per_epoch"])
    dtype = r.get("dtype", "float32")
    return [
        name if dtype == "float32" else f"{name} ({dtype})",
        str(r["batch_size"]),
        _rate(r["train_images_per_s"]),
        _rate(r["eval_images_per_s"]),
        _fmt(r["compile_train_epoch_s"], digits=2),
        _fmt(r["compile_eval_s"], digits=2),
        _fmt(r["step_s"], 1e3, 2),
        _fmt(r["epoch_s"], digits=3),
        _fmt(r["epoch_over_steps"], digits=3),
        transfers,
        flops,
        _fmt(r["achieved_flops_per_s"], 1e-9),
        _fmt(r["matmul_peak_flops_per_s"], 1e-9),
        _percent(r["fraction_of_matmul_peak"]),
    ]


def _conv_table(name: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{name}: one 3x3 conv per stage, alone", box=box.SIMPLE_HEAD)
    ops = tuple(_conv_ops())
    columns = ["input", "MFLOP", *(f"{op} ms" for op in ops)]
    columns += [*(f"{op} in scan ms" for op in ops), "of peak f/i/k"]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        fractions = "/".join(_percent(row[f"{op}_fraction_of_matmul_peak"], 0) for op in ops)
        times = [_fmt(row[f"{op}_s"], 1e3, 2) for op in ops]
        times += [_fmt(row[f"{op}_in_scan_s"], 1e3, 2) for op in ops]
        table.add_row(row["shape"], _fmt(row["flops"], 1e-6), *times, fractions)
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line; flags left out take the defaults of the mode (`--quick` or not)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    full, quick = DEFAULTS, QUICK_DEFAULTS
    parser.add_argument(
        "--models", default=None,
        help=f"Comma-separated (default: {full.models}; with --quick: {quick.models}).",
    )  # fmt: skip
    parser.add_argument(
        "--epochs", type=int, default=None,
        help=f"Timed epochs and eval passes (default: {full.epochs}; with --quick: {quick.epochs}).",
    )  # fmt: skip
    parser.add_argument(
        "--step_repeats", type=int, default=None,
        help=f"Timed single steps (default: {full.step_repeats}; with --quick: {quick.step_repeats}).",
    )  # fmt: skip
    parser.add_argument(
        "--batches_per_epoch", type=int, default=None,
        help="Batches per epoch for every model (default: each model's own dataset size).",
    )  # fmt: skip
    parser.add_argument(
        "--batch_size", type=int, default=None,
        help="Batch size for every model (default: each model's own: 64, 512, 128, 32).",
    )  # fmt: skip
    parser.add_argument(
        "--matmul_size", type=int, default=None,
        help=f"Side of the peak matmul (default: {full.matmul_size}; with --quick: {quick.matmul_size}).",
    )  # fmt: skip
    parser.add_argument(
        "--matmul_repeats", type=int, default=None,
        help=f"Calls per peak sample, the best taken (default: {full.matmul_repeats}; with --quick: "
        f"{quick.matmul_repeats}).",
    )  # fmt: skip
    parser.add_argument("--json", default="runs/benchmark.json", help="Where to write the results.")
    parser.add_argument(
        "--quick", action="store_true",
        help="Tiny models (QUICK_SPECS; no ResNet by default), few repeats: seconds, for tests.",
    )  # fmt: skip
    parser.add_argument(
        "--loop", default="auto", choices=("auto", *train.LOOPS),
        help="The train loop (config.train.loop); auto: steps for conv models on CPU, else scan.",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for field, default in (QUICK_DEFAULTS if args.quick else DEFAULTS)._asdict().items():
        if getattr(args, field) is None:
            setattr(args, field, default)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark from command-line arguments, prints the table, writes the JSON."""
    args = parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    results = run(
        names,
        epochs=args.epochs,
        step_repeats=args.step_repeats,
        batches_per_epoch=args.batches_per_epoch,
        batch_size=args.batch_size,
        matmul_size=args.matmul_size,
        matmul_repeats=args.matmul_repeats,
        quick=args.quick,
        loop=args.loop,
    )
    print_table(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        report.console.print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()

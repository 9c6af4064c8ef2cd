"""Throughput benchmark of the library's jitted train epoch and evaluation, on synthetic data.

    python scripts/benchmark.py                          # mlp, wide_mlp, resnet32 -> table + JSON
    python -m incremental.bench --models=wide_mlp --epochs=5 --json=runs/wide.json
    python scripts/benchmark.py --quick                  # shrunken models and data, a few seconds

For each model it measures train and eval images/s, the compile time of the functions a phase
compiles, one train step timed alone against the epoch (one `lax.scan` over device-resident data,
so the difference is the input pipeline's and the loop's overhead), host-device transfers per
epoch, and the achieved FLOP/s as a fraction of a float32 matmul timed by the same process. For
ResNet-32 it also times the 3x3 convolutions of each stage and their two gradients alone.
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
}
# `--quick`: the same three code paths at sizes that run in seconds (tests).
QUICK_SPECS: dict[str, Spec] = {
    "mlp": Spec("mlp", {"hidden": (32,)}, (8, 8, 1), 10, 16, 40),
    "wide_mlp": Spec("mlp", {"hidden": (128, 128)}, (8, 8, 1), 10, 32, 64),
    "resnet32": Spec("resnet32", {"depth": 8}, (16, 16, 3), 10, 8, 16),
}


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


def _call_times(fn: Callable, args: Sequence[Any], repeats: int) -> list[float]:
    """Wall times of `repeats` calls of `fn(*args)`, each waited for, after one warm-up call."""
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


def matmul_peak(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Float32 FLOP/s of a jitted square matmul, best of `repeats`: the reference peak."""
    a_key, b_key = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(a_key, (size, size), jnp.float32)
    b = jax.random.normal(b_key, (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    best = min(_call_times(matmul, (a, b), repeats))
    return {"size": size, "seconds": best, "flops_per_s": 2 * size**3 / best}


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
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_key, jnp.zeros((1, *spec.input_shape), jnp.float32), train=False)
    method = methods.build("finetune", {}, None)
    info = PhaseInfo(0, 0, spec.num_classes)
    setup = method.setup(info)
    config = base_config()
    steps = -(-spec.num_examples // spec.batch_size)
    hp = train.phase_hparams(config, 0)
    tx = train.make_optimizer(config.train, hp, steps, variables["params"], setup, 0)
    state = train.TrainState(
        variables["params"],
        variables.get("batch_stats", {}),
        tx.init(variables["params"]),
        train_key,
        jnp.zeros((), jnp.int32),
    )
    norm = device.fit_normalizer(x, is_image=True)
    return Bench(model, tx, method, info, setup, norm, *jax.device_put((x, y, state)))


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
            variables, batch.x, train=True, mutable=["batch_stats"]
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


def time_epochs(epoch: Callable, bench: Bench, epochs: int) -> dict[str, Any]:
    """Times `epochs` calls of the compiled epoch, after one untimed call under the transfer guard.

    The first call of a compiled program also allocates its buffers and warms the caches (about
    45 ms against 3 ms for the digits MLP's epoch here), so it is a warm-up, not a sample.
    """
    out, transfer_error = guarded(epoch, bench.state, {}, bench.x, bench.y)
    state = bench.state if out is None else out[0]
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        state, _, metrics = epoch(state, {}, bench.x, bench.y)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {
        "epoch_s": float(np.median(times)),
        "transfers_per_epoch": None if transfer_error else 0,
        "transfer_error": transfer_error,
        "final_state": state,
    }


def time_step(bench: Bench, spec: Spec, state: train.TrainState, repeats: int) -> dict:
    """Compiles and times one step alone, on the first batch of a shuffled epoch."""
    idx, weight = device.batch_indices(jax.random.PRNGKey(0), spec.num_examples, spec.batch_size)
    step_args = (bench.x, bench.y, idx[0], weight[0])
    step, compile_s = _timed_compile(make_train_step(bench), state, *step_args)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        state, loss = step(state, *step_args)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return {
        "compile_train_step_s": compile_s,
        "step_s": float(np.median(times[1:])),
        "flops_per_step_xla": _xla_flops(step),
        "final_state": state,
    }


def resolve_loop(loop: str, spec: Spec) -> str:
    """`auto` as the run resolves it (`run.train_loop`): steps for conv models on CPU, else scan."""
    if loop != "auto":
        return loop
    return "steps" if jax.default_backend() == "cpu" and spec.model != "mlp" else "scan"


def measure_train(
    bench: Bench, spec: Spec, epochs: int, step_repeats: int, loop: str = "auto"
) -> dict[str, Any]:
    """Compiles and times the epoch and the step alone; checks the epoch for transfers.

    With `loop='steps'` (a Python loop over one jitted step) the compile time is the first epoch's
    time less a later epoch's.
    """
    loop = resolve_loop(loop, spec)
    epoch_fn = train.make_train_epoch(
        model=bench.model, tx=bench.tx, method=bench.method, info=bench.info,
        setup=bench.setup, norm=bench.norm, batch_size=spec.batch_size, loop=loop,
    )  # fmt: skip
    if loop == "scan":
        epoch, compile_epoch_s = _timed_compile(epoch_fn, bench.state, {}, bench.x, bench.y)
        epoch_m = time_epochs(epoch, bench, epochs)
    else:
        start = time.perf_counter()
        state, _, _ = epoch_fn(bench.state, {}, bench.x, bench.y)
        jax.block_until_ready(state)
        first_s = time.perf_counter() - start
        epoch_m = time_epochs(epoch_fn, bench._replace(state=state), epochs)
        compile_epoch_s = max(first_s - epoch_m["epoch_s"], 0.0)
    step_m = time_step(bench, spec, epoch_m.pop("final_state"), step_repeats)
    return {"loop": loop, "compile_train_epoch_s": compile_epoch_s, **epoch_m, **step_m}


def measure_eval(bench: Bench, spec: Spec, state: train.TrainState, repeats: int) -> dict:
    """Compiles and times `train.make_apply_batches` with the method's predict rule."""
    apply_batches = train.make_apply_batches(bench.model, bench.norm, bench.method.predict)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    batches, _ = device.padded_batches(np.asarray(bench.x), spec.batch_size)
    batches = jax.device_put(batches)
    evaluate, compile_s = _timed_compile(apply_batches, variables, {}, batches)
    seconds = float(np.median(_call_times(evaluate, (variables, {}, batches), repeats)))
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


def summarise(spec: Spec, train_m: dict, eval_m: dict, peak: float) -> dict[str, Any]:
    """Derived figures: images/s, the epoch's overhead over its steps, FLOP/s against the peak."""
    num_batches = -(-spec.num_examples // spec.batch_size)
    analytic = analytic_flops(spec)
    xla = train_m["flops_per_step_xla"]
    flops, source = (xla, "xla") if xla else (analytic and analytic["train"], "analytic")
    achieved = flops * num_batches / train_m["epoch_s"] if flops else None
    return {
        "train_images_per_s": spec.num_examples / train_m["epoch_s"],
        "steps_sum_s": num_batches * train_m["step_s"],
        "epoch_over_steps": train_m["epoch_s"] / (num_batches * train_m["step_s"]),
        "compile_per_phase_s": train_m["compile_train_epoch_s"] + eval_m["compile_eval_s"],
        "flops_per_step_analytic": analytic and analytic["train"],
        "flops_per_step": flops,
        "flops_source": source,
        "achieved_flops_per_s": achieved,
        "fraction_of_matmul_peak": achieved / peak if achieved else None,
    }


def conv_breakdown(
    batch_size: int, image_size: int, peak: float, repeats: int = 3
) -> list[dict[str, Any]]:
    """Times a 3x3 stride-1 conv of each ResNet stage alone: forward, input and kernel gradients.

    Each of the three costs 2 * B * H * W * 9 * C * C FLOPs, so their rates compare directly
    with each other and with the matmul peak. Each is timed on its own and inside a `lax.scan`,
    where the train epoch runs them.
    """
    rows = []
    for width, size in ((16, image_size), (32, image_size // 2), (64, image_size // 4)):
        x_key, w_key = jax.random.split(jax.random.PRNGKey(width))
        x = jax.random.normal(x_key, (batch_size, size, size, width), jnp.float32)
        w = jax.random.normal(w_key, (3, 3, width, width), jnp.float32)
        flops = 2 * batch_size * size * size * 9 * width * width
        row = {"shape": f"{batch_size}x{size}x{size}x{width}", "flops": flops}
        for name, fn in _conv_ops().items():
            for suffix, op, calls in (("", fn, 1), ("_in_scan", _in_scan(fn, 2), 2)):
                compiled = jax.jit(op).lower(x, w).compile()
                row[f"{name}{suffix}_s"] = min(_call_times(compiled, (x, w), repeats)) / calls
            row[f"{name}_fraction_of_matmul_peak"] = flops / row[f"{name}_s"] / peak
        rows.append(row)
    return rows


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


def benchmark_model(
    name: str, spec: Spec, *, epochs: int, step_repeats: int, peak: float, loop: str = "auto"
) -> dict[str, Any]:
    """All measurements of one model, as a JSON-ready dict."""
    bench = build_bench(spec)
    train_m = measure_train(bench, spec, epochs, step_repeats, loop)
    eval_m = measure_eval(bench, spec, train_m.pop("final_state"), epochs)
    result = {
        "model": spec.model,
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.kwargs.items()},
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "batch_size": spec.batch_size,
        "num_examples": spec.num_examples,
        "batches_per_epoch": -(-spec.num_examples // spec.batch_size),
        **train_m,
        **eval_m,
        **summarise(spec, train_m, eval_m, peak),
    }
    if spec.model == "resnet32":
        result["convs"] = conv_breakdown(spec.batch_size, spec.input_shape[0], peak)
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
    epochs: int = 2,
    step_repeats: int = 5,
    batches_per_epoch: int | None = None,
    batch_size: int | None = None,
    matmul_size: int = 2048,
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
    peak = matmul_peak(matmul_size)
    results = {name: {} for name in specs}
    for name, spec in specs.items():
        results[name] = benchmark_model(
            name,
            spec,
            epochs=epochs,
            step_repeats=step_repeats,
            peak=peak["flops_per_s"],
            loop=loop,
        )
    return {"machine": machine(), "matmul": peak, "models": results}


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


def print_table(results: dict[str, Any]) -> None:
    """The models as one table, then ResNet-32's convolutions alone."""
    peak = results["matmul"]
    report.console.print(
        f"float32 matmul {peak['size']}x{peak['size']}: {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s "
        f"on {results['machine']['device_kind']} ({results['machine']['cpu_count']} CPUs)"
    )
    table = Table(box=box.SIMPLE_HEAD)
    columns = (
        "model", "batch", "train img/s", "eval img/s", "compile epoch s", "compile eval s",
        "step ms", "epoch s", "epoch/steps", "transfers", "GFLOP/step", "GFLOP/s", "of peak",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, r in results["models"].items():
        table.add_row(*_model_row(name, r))
    _wide_console().print(table)
    for name, r in results["models"].items():
        if "convs" in r:
            _wide_console().print(_conv_table(name, r["convs"]))


def _wide_console() -> Console:
    """The report console on a terminal; a wide one for pipes and files (rich assumes 80 there)."""
    if report.console.is_terminal:
        return report.console
    return Console(highlight=False, width=200)


def _model_row(name: str, r: dict[str, Any]) -> list[str]:
    flops = f"{_fmt(r['flops_per_step'], 1e-9, 2)} ({r['flops_source']})"
    transfers = "?" if r["transfers_per_epoch"] is None else str(r["transfers_per_epoch"])
    return [
        name,
        str(r["batch_size"]),
        _fmt(r["train_images_per_s"], digits=0),
        _fmt(r["eval_images_per_s"], digits=0),
        _fmt(r["compile_train_epoch_s"], digits=2),
        _fmt(r["compile_eval_s"], digits=2),
        _fmt(r["step_s"], 1e3, 2),
        _fmt(r["epoch_s"], digits=3),
        _fmt(r["epoch_over_steps"], digits=3),
        transfers,
        flops,
        _fmt(r["achieved_flops_per_s"], 1e-9),
        f"{_fmt(r['fraction_of_matmul_peak'], 100)}%",
    ]


def _conv_table(name: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{name}: one 3x3 conv per stage, alone", box=box.SIMPLE_HEAD)
    ops = ("forward", "grad_input", "grad_kernel")
    columns = ["input", "MFLOP", *(f"{op} ms" for op in ops)]
    columns += [*(f"{op} in scan ms" for op in ops), "of peak f/i/k"]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        fractions = "/".join(f"{100 * row[f'{op}_fraction_of_matmul_peak']:.0f}%" for op in ops)
        times = [_fmt(row[f"{op}_s"], 1e3, 2) for op in ops]
        times += [_fmt(row[f"{op}_in_scan_s"], 1e3, 2) for op in ops]
        table.add_row(row["shape"], _fmt(row["flops"], 1e-6), *times, fractions)
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,wide_mlp,resnet32", help="Comma-separated.")
    parser.add_argument("--epochs", type=int, default=2, help="Timed epochs (and eval passes).")
    parser.add_argument("--step_repeats", type=int, default=5, help="Timed single steps.")
    parser.add_argument(
        "--batches_per_epoch", type=int, default=None,
        help="Batches per epoch for every model (default: each model's own dataset size).",
    )  # fmt: skip
    parser.add_argument(
        "--batch_size", type=int, default=None,
        help="Batch size for every model (default: each model's own: 64, 512, 128).",
    )  # fmt: skip
    parser.add_argument("--matmul_size", type=int, default=2048, help="Side of the peak matmul.")
    parser.add_argument("--json", default="runs/benchmark.json", help="Where to write the results.")
    parser.add_argument("--quick", action="store_true", help="Shrunken models and data (tests).")
    parser.add_argument(
        "--loop", default="auto", choices=("auto", *train.LOOPS),
        help="The train loop (config.train.loop); auto: steps for conv models on CPU, else scan.",
    )  # fmt: skip
    return parser.parse_args(argv)


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

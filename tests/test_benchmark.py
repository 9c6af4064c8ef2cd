import contextlib
import copy
import io
import json
import math

import pytest

from incremental import bench

FIELDS = (
    "train_images_per_s",
    "eval_images_per_s",
    "compile_train_epoch_s",
    "compile_eval_s",
    "compile_per_phase_s",
    "step_s",
    "epoch_s",
    "steps_sum_s",
    "epoch_over_steps",
    "flops_per_step",
    "achieved_flops_per_s",
    "matmul_peak_flops_per_s",
    "fraction_of_matmul_peak",
)
# The progress lines of one model, in the order they are printed.
PROGRESS = (
    "building",
    "compiling train epoch",
    "timing 2 train epoch(s)",
    "train ",
    "compiling one train step",
    "step ",
    "compiling eval",
    "eval ",
    "GFLOP/s = ",
    "done in",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick` run (its defaults: mlp and wide_mlp, 2 epochs): the returned results, the
    JSON, everything printed, and what had been printed when each model started."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out = io.StringIO()
    at_build = {}
    build_bench = bench.build_bench
    names = {repr(spec): name for name, spec in bench.QUICK_SPECS.items()}

    def recording_build(spec, seed=0):
        at_build[names[repr(spec)]] = out.getvalue()
        return build_bench(spec, seed)

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(bench, "build_bench", recording_build)
        returned = bench.main(["--quick", f"--json={path}"])
    return returned, json.loads(path.read_text()), out.getvalue(), at_build


def test_mlp_flops_match_a_hand_count():
    # 64 -> 256 -> 10 at batch 64: 64 * 256 + 256 * 10 = 18,944 multiply-adds per example.
    flops = bench.mlp_flops(64, (256,), 10, 64)
    assert flops["forward"] == 2 * 64 * 18_944 == 2_424_832
    # Weight gradients double it; input gradients add the head's 2 * 64 * 2,560 (not the data's).
    assert flops["train"] == 2_424_832 * 2 + 2 * 64 * 2_560 == 5_177_344


def test_quick_benchmark_writes_positive_figures_and_makes_no_transfers(quick_run):
    returned, results, _, _ = quick_run
    # ResNet-32 takes the same code paths; --quick leaves it out (its compiles take tens of s).
    assert set(results["models"]) == {"mlp", "wide_mlp"}
    assert results["matmul"]["flops_per_s"] > 0
    for name, model in results["models"].items():
        for field in FIELDS:
            value = model[field]
            assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (
                name,
                field,
            )
        assert model["transfers_per_epoch"] == 0, model["transfer_error"]
        assert model["flops_source"] == "xla"
        assert len(model["epoch_times_s"]) == bench.QUICK_DEFAULTS.epochs
    wide = results["models"]["wide_mlp"]
    spec = bench.QUICK_SPECS["wide_mlp"]
    assert (
        wide["flops_per_step_analytic"]
        == bench.mlp_flops(64, spec.kwargs["hidden"], 10, 32)["train"]
    )
    # XLA also counts the head's padding to 128 columns, the loss and the optimizer, never less.
    assert wide["flops_per_step"] >= wide["flops_per_step_analytic"]
    assert returned["models"]["mlp"]["batch_size"] == results["models"]["mlp"]["batch_size"]


def test_progress_lines_are_printed_as_each_model_runs(quick_run):
    _, _, printed, at_build = quick_run
    table = printed.index("train img/s   eval img/s")
    assert printed.index("benchmark: mlp, wide_mlp on ") < printed.index("matmul peak") < table
    lines = printed[:table].splitlines()
    for name in ("mlp", "wide_mlp"):
        own = [line.removeprefix(f"{name}: ") for line in lines if line.startswith(f"{name}: ")]
        assert len(own) == len(PROGRESS), own
        for step, line in zip(PROGRESS, own, strict=True):
            assert step in line, (name, step, line)
    # Written as it goes, not at the end: when wide_mlp starts, mlp's lines are out, its own not.
    assert "\nmlp: done in" in at_build["wide_mlp"]
    assert "wide_mlp: compiling" not in at_build["wide_mlp"]
    assert "mlp: building" in at_build["mlp"] and "mlp: compiling" not in at_build["mlp"]


def test_fraction_of_peak_is_against_the_peak_sampled_around_its_epochs(quick_run):
    _, results, _, _ = quick_run
    epochs = bench.QUICK_DEFAULTS.epochs
    everything = results["matmul"]["samples"]
    # One sample when the meter is ready, then one before each model's epochs and after each.
    assert len(everything) == 1 + 2 * (epochs + 1)
    assert results["matmul"]["flops_per_s"] == max(everything)
    for index, model in enumerate(results["models"].values()):
        samples = model["matmul_peak_samples"]
        start = 1 + index * (epochs + 1)
        assert samples == everything[start : start + epochs + 1]
        assert model["matmul_peak_flops_per_s"] == max(samples)
        fraction = model["achieved_flops_per_s"] / max(samples)
        assert model["fraction_of_matmul_peak"] == pytest.approx(fraction)


def test_alternate_samples_the_peak_before_each_timed_call_and_after_the_last():
    events = []

    class Meter:
        def sample(self):
            events.append("peak")
            return 1.0

    times, peaks = bench.alternate(lambda: events.append("call"), 3, Meter())
    assert events == ["peak", "call", "peak", "call", "peak", "call", "peak"]
    assert len(times) == 3 and peaks == [1.0] * 4


def test_a_fraction_above_the_peak_is_shown_and_flagged(quick_run):
    _, results, _, _ = quick_run
    results = copy.deepcopy(results)

    def printed_table():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            bench.print_table(results)
        return out.getvalue()

    results["models"]["mlp"]["fraction_of_matmul_peak"] = 0.25
    results["models"]["wide_mlp"]["fraction_of_matmul_peak"] = 0.5
    table = printed_table()
    assert "25.0%" in table and "50.0%" in table
    assert "*" not in table and "above the matmul peak" not in table
    results["models"]["wide_mlp"]["fraction_of_matmul_peak"] = 1.3
    table = printed_table()
    assert "130.0%*" in table and "25.0%" in table and "25.0%*" not in table
    assert "* above the matmul peak timed alongside it" in table


def test_quick_changes_the_defaults_and_flags_still_win():
    assert bench.parse_args([]).models == "mlp,wide_mlp,resnet32,vit_b16"
    quick = bench.parse_args(["--quick"])
    assert (quick.models, quick.epochs, quick.matmul_size) == ("mlp,wide_mlp", 2, 512)
    args = bench.parse_args(["--quick", "--epochs=5", "--models=resnet32"])
    assert (args.epochs, args.models, args.step_repeats) == (5, "resnet32", 2)


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match=r"Unknown model\(s\) \['vit'\].*resnet32"):
        bench.main(["--models=mlp,vit", "--json="])


def test_bad_matmul_size_is_named():
    with pytest.raises(ValueError, match="--matmul_size and --matmul_repeats must be at least 1"):
        bench.PeakMeter(0, 3)


def test_batch_size_override_keeps_the_batches_per_epoch():
    specs = bench.resolve_specs(["resnet32", "mlp"], batch_size=512)
    for name, spec in specs.items():
        original = bench.SPECS[name]
        assert spec.batch_size == 512
        assert -(-spec.num_examples // 512) == -(-original.num_examples // original.batch_size)
    with pytest.raises(ValueError, match="--batch_size must be at least 1"):
        bench.resolve_specs(["mlp"], batch_size=0)


def test_the_vit_row_computes_in_bfloat16_against_a_bfloat16_peak():
    """ViT-B/16's row (in --quick, a one-block ViT-Ti at 16 px, the same code paths) times a
    bfloat16 model against a bfloat16 matmul sampled around its epochs; float32's meter only
    starts."""
    assert bench.SPECS["vit_b16"].input_shape == (224, 224, 3)
    assert bench.SPECS["vit_b16"].kwargs == {"size": "b", "patch": 16, "dtype": "bfloat16"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = bench.run(
            ["vit_b16"], quick=True, epochs=1, step_repeats=1, matmul_size=128, matmul_repeats=1
        )
        bench.print_table(results)
    vit, peak = results["models"]["vit_b16"], results["matmul_bfloat16"]
    assert vit["dtype"] == peak["dtype"] == "bfloat16" and results["matmul"]["dtype"] == "float32"
    assert len(results["matmul"]["samples"]) == 1  # its first sample, no model's
    assert vit["matmul_peak_samples"] == peak["samples"][1:]
    for field in FIELDS:
        assert math.isfinite(vit[field]) and vit[field] > 0, field
    assert vit["transfers_per_epoch"] == 0 and vit["flops_source"] == "xla"
    assert "vit_b16 (bfloat16)" in out.getvalue() and "bfloat16 matmul 128x128" in out.getvalue()

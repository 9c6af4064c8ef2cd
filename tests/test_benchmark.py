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
    "fraction_of_matmul_peak",
)


def test_mlp_flops_match_a_hand_count():
    # 64 -> 256 -> 10 at batch 64: 64 * 256 + 256 * 10 = 18,944 multiply-adds per example.
    flops = bench.mlp_flops(64, (256,), 10, 64)
    assert flops["forward"] == 2 * 64 * 18_944 == 2_424_832
    # Weight gradients double it; input gradients add the head's 2 * 64 * 2,560 (not the data's).
    assert flops["train"] == 2_424_832 * 2 + 2 * 64 * 2_560 == 5_177_344


def test_quick_benchmark_writes_positive_figures_and_makes_no_transfers(tmp_path):
    path = tmp_path / "bench.json"
    # ResNet-32 takes the same code path; left out to keep CI short (its compile dominates).
    args = ["--quick", "--models=mlp,wide_mlp", "--epochs=1", "--step_repeats=1"]
    args += ["--matmul_size=256", f"--json={path}"]
    returned = bench.main(args)
    results = json.loads(path.read_text())
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
    wide = results["models"]["wide_mlp"]
    spec = bench.QUICK_SPECS["wide_mlp"]
    assert (
        wide["flops_per_step_analytic"]
        == bench.mlp_flops(64, spec.kwargs["hidden"], 10, 32)["train"]
    )
    # XLA also counts the head's padding to 128 columns, the loss and the optimizer, never less.
    assert wide["flops_per_step"] >= wide["flops_per_step_analytic"]
    assert returned["models"]["mlp"]["batch_size"] == results["models"]["mlp"]["batch_size"]


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match=r"Unknown model\(s\) \['vit'\].*resnet32"):
        bench.main(["--models=mlp,vit", "--json="])


def test_batch_size_override_keeps_the_batches_per_epoch():
    specs = bench.resolve_specs(["resnet32", "mlp"], batch_size=512)
    for name, spec in specs.items():
        original = bench.SPECS[name]
        assert spec.batch_size == 512
        assert -(-spec.num_examples // 512) == -(-original.num_examples // original.batch_size)
    with pytest.raises(ValueError, match="--batch_size must be at least 1"):
        bench.resolve_specs(["mlp"], batch_size=0)

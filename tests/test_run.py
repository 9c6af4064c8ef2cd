"""End to end on digits (5 phases of 2 classes): the four answers behave as they must."""

import json
import os

import jax
import numpy as np
import pytest

from configs import digits
from incremental import checkpoint, methods
from incremental import run as run_lib
from incremental.methods import PhaseInfo
from incremental.phase import load, save
from incremental.phase import model as phase_model


def config_for(method, epochs=10, **train):
    config = digits.get_config(f"method={method}")
    config.log.progress = False
    config.log.plot = False
    config.train.epochs = config.train_first.epochs = epochs
    config.train.milestones = config.train_first.milestones = (epochs - 2,)
    config.train.update(train)
    return config


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One run of each method, shared by the tests below."""
    out = {}
    for method in ("finetune", "joint", "freeze_backbone", "new_head_only"):
        workdir = str(tmp_path_factory.mktemp(method))
        out[method] = (run_lib.run(config_for(method), workdir), workdir)
    return out


def test_joint_is_the_upper_bound(results):
    joint, _ = results["joint"]
    assert joint["last_accuracy"] >= 0.90
    assert joint["complete"] and len(joint["accuracy_matrix"]) == 5


def test_finetune_forgets(results):
    finetune, _ = results["finetune"]
    assert finetune["last_accuracy"] <= 0.35
    assert finetune["forgetting"] >= 0.5
    assert finetune["backward_transfer"] <= -0.5
    assert finetune["accuracy_matrix"][-1][-1] >= 0.9  # it learned the last phase, and only that


def test_new_head_only_keeps_old_phases_within_task_aware_evaluation(results):
    result, _ = results["new_head_only"]
    task = result["task_aware_matrix"]
    for j in range(5):
        for i in range(j, 5):
            assert task[i][j] == task[j][j]  # frozen backbone and columns: exactly the same
    assert result["forgetting"] > 0.5  # ...while class-incremental accuracy collapses


def test_freeze_backbone_keeps_the_backbone_and_beats_finetune(results):
    result, workdir = results["freeze_backbone"]
    assert result["last_accuracy"] > results["finetune"][0]["last_accuracy"] + 0.3
    ckpts = checkpoint.Checkpoints(workdir)
    config = config_for("freeze_backbone")
    data, protocol, _ = load.load_data(config)
    method = methods.build("freeze_backbone")
    states = [
        ckpts.restore(p, save.state_target(config, method, protocol, data, p))[0] for p in (0, 4)
    ]
    ckpts.close()
    for a, b in zip(*(jax.tree.leaves(s["params"]["backbone"]) for s in states), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert states[1]["params"]["head"]["kernel"].shape[1] == 10


def test_results_json_is_the_documented_format(results):
    _, workdir = results["joint"]
    with open(os.path.join(workdir, "results.json")) as f:
        doc = json.load(f)
    for key in (
        "accuracy_matrix",
        "last_accuracy",
        "average_incremental_accuracy",
        "forgetting",
        "forgetting_pycil",
        "backward_transfer",
        "task_aware_accuracy",
        "phases",
        "config",
        "versions",
    ):
        assert key in doc
    assert [len(row) for row in doc["accuracy_matrix"]] == [1, 2, 3, 4, 5]
    values = [v for row in doc["accuracy_matrix"] for v in row] + doc["task_aware_accuracy"]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert doc["average_incremental_accuracy"] == pytest.approx(np.mean(doc["accuracy"]))
    assert sorted(c for p in doc["phases"] for c in p["classes"]) == list(range(10))
    assert all(p["train_seconds"] > 0 and p["eval_seconds"] > 0 for p in doc["phases"])
    assert set(doc["versions"]) >= {"jax", "flax", "optax"}
    # digits' 10 classes are one PyCIL block: its figure is that block's drop from its best.
    assert 0 <= doc["forgetting_pycil"] <= 1


@pytest.mark.parametrize("optimizer, carry", [("sgd", False), ("adam", True)])
def test_resume_after_phase_2_gives_the_same_numbers(tmp_path, optimizer, carry):
    config = config_for("finetune", epochs=3, optimizer=optimizer, carry_opt_state=carry, lr=0.01)
    config.train_first.lr = 0.01
    whole = run_lib.run(config, str(tmp_path / "whole"))
    partial = run_lib.run(config, str(tmp_path / "staged"), stop_after=2)
    assert len(partial["accuracy_matrix"]) == 3 and not partial["complete"]
    resumed = run_lib.run(config, str(tmp_path / "staged"))
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["task_aware_matrix"] == whole["task_aware_matrix"]
    assert [p["final_loss"] for p in resumed["phases"]] == [
        p["final_loss"] for p in whole["phases"]
    ]


def test_resume_with_another_config_is_refused_and_changes_nothing(tmp_path):
    config = config_for("finetune", epochs=1)
    run_lib.run(config, str(tmp_path), stop_after=0)
    # The work directory's lock (`.lock`) is taken and released by every run; nothing else moves.
    before = {p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path) if p != ".lock"}
    config.train.lr = 0.5
    config.seed = 3
    config.log.progress = True  # logging keys may differ freely
    with pytest.raises(
        ValueError, match=r"(?s)different config.*seed: 0 -> 3.*train.lr: 0.05 -> 0.5"
    ):
        run_lib.run(config, str(tmp_path))
    assert before == {
        p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path) if p != ".lock"
    }


def test_imprinted_head_init_runs_and_starts_new_columns_at_old_norms(tmp_path):
    config = config_for("finetune", epochs=2)
    config.head.init = "imprint"
    results = run_lib.run(config, str(tmp_path), stop_after=1)
    assert len(results["accuracy_matrix"]) == 2


def test_bfloat16_computes_in_bf16_and_keeps_float32_state(tmp_path):
    """config.dtype=bfloat16: the backbone computes in bf16; params and optimizer state stay f32."""
    import jax.numpy as jnp

    config = digits.get_config("method=replay")
    config.train.epochs = config.train_first.epochs = 5
    config.log.progress = config.log.plot = False
    config.dtype = "bfloat16"
    results = run_lib.run(config, str(tmp_path))
    data, protocol, method = load.validate(config, str(tmp_path))
    model = phase_model.phase_model(config, method, PhaseInfo(0, 0, 2))
    assert model.backbone.dtype == jnp.bfloat16
    ckpts = checkpoint.Checkpoints(str(tmp_path))
    target = save.state_target(config, method, protocol, data, 4)
    state, _, _ = ckpts.restore(4, target)
    ckpts.close()
    dtypes = {leaf.dtype for leaf in jax.tree.leaves((state["params"], state["opt_state"]))}
    assert dtypes <= {jnp.dtype("float32"), jnp.dtype("int32")}, dtypes
    assert results["last_accuracy"] > 0.85  # replay in float32 here: about 0.96


def test_the_first_phase_a_process_trains_records_its_start_up(tmp_path):
    config = digits.get_config()
    config.train.epochs = config.train_first.epochs = 1
    config.log.progress = config.log.plot = False
    staged = run_lib.run(config, str(tmp_path), stop_after=1)
    resumed = run_lib.run(config, str(tmp_path))
    startup = [p.get("startup_seconds") for p in resumed["phases"]]
    assert staged["phases"][0]["startup_seconds"] > 0
    assert startup[0] == staged["phases"][0]["startup_seconds"]  # as the first process saved it
    assert startup[2] > startup[0] and startup[1] is None and startup[3:] == [None, None]

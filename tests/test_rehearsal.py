"""Rehearsal methods end to end on digits (5 phases x 2 classes, memory 200)."""

import numpy as np
import pytest

from configs import digits
from incremental import checkpoint, methods
from incremental import run as run_lib
from incremental.phase import load, save


def config_for(method, epochs=10, seed=0):
    config = digits.get_config(f"method={method}")
    config.seed = seed
    config.log.progress = config.log.plot = False
    config.train.epochs = config.train_first.epochs = epochs
    config.train.milestones = config.train_first.milestones = (epochs - 2,)
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return {
        m: run_lib.run(config_for(m), str(tmp_path_factory.mktemp(m)))
        for m in ("finetune", "joint")
    }


def test_replay_remembers_and_reports_nme(tmp_path, reference):
    results = run_lib.run(config_for("replay"), str(tmp_path))
    assert results["last_accuracy"] >= reference["finetune"]["last_accuracy"] + 0.60
    assert results["last_accuracy"] >= reference["joint"]["last_accuracy"] - 0.08
    assert len(results["nme_accuracy_matrix"]) == 5
    assert results["nme_last_accuracy"] >= reference["finetune"]["last_accuracy"] + 0.60
    # The memory in the last checkpoint holds 200 // 10 = 20 exemplars of every class.
    ckpts = checkpoint.Checkpoints(str(tmp_path))
    config = config_for("replay")
    data, protocol, _ = load.load_data(config)
    method = methods.build("replay", memory=config.memory)
    _, method_state, _ = ckpts.restore(4, save.state_target(config, method, protocol, data, 4))
    ckpts.close()
    labels = np.asarray(method_state["memory"]["labels"])
    assert np.bincount(labels, minlength=10).tolist() == [20] * 10
    indices = np.asarray(method_state["memory"]["indices"])
    np.testing.assert_array_equal(data.y_train[indices], labels)


def test_replay_resume_restores_the_memory(tmp_path):
    config = config_for("replay", epochs=3)
    whole = run_lib.run(config, str(tmp_path / "whole"))
    run_lib.run(config, str(tmp_path / "staged"), stop_after=2)
    resumed = run_lib.run(config, str(tmp_path / "staged"))
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["nme_accuracy_matrix"] == whole["nme_accuracy_matrix"]

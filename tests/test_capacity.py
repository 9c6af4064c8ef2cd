"""head.capacity: a head with a column for every class compiles the steps once and gives the
widening path's numbers."""

import json

import numpy as np
import pytest
from capacity_helpers import NUM_CLASSES, losses, run_both_heads, small_config

from incremental import run as run_lib
from incremental import workdirs


@pytest.mark.parametrize(
    "method, overrides, programs",
    [
        ("finetune", {}, 1),
        # The exemplar memory grows every phase, outside the program; NME scores every class of
        # the wide head; several calls of the epoch per epoch.
        ("replay", {"checkpoint.every_steps": 5}, 1),
        (
            "joint",
            {"train.loop": "steps", "train.optimizer": "adam", "train.carry_opt_state": True},
            1,
        ),
        ("finetune", {"train.schedule": "cosine", "head.init": "imprint"}, 1),
        # Two programs: phase 0's and the frozen backbone's.
        ("freeze_backbone", {"train_first.lr": 0.1}, 2),
        # Batches streamed from the host: one jitted step for every phase's stream.
        ("replay", {"dataset.stream": True, "train.loop": "steps"}, 1),
    ],
)
def test_capacity_gives_the_widening_numbers_and_compiles_once(
    tmp_path, monkeypatch, method, overrides, programs
):
    """Capacity and widening give the same numbers; widening traces the train step and the
    prediction once per phase, capacity once per run (per program)."""
    results, counts = run_both_heads(tmp_path, monkeypatch, method, overrides)
    wide, widened = results[NUM_CLASSES], results[0]
    assert wide["accuracy_matrix"] == widened["accuracy_matrix"]
    assert wide["task_aware_matrix"] == widened["task_aware_matrix"]
    assert wide.get("nme_accuracy_matrix") == widened.get("nme_accuracy_matrix")
    # Measured bit-identical here (10 classes); the tolerance allows another reduction order.
    np.testing.assert_allclose(losses(wide), losses(widened), rtol=1e-6)
    assert wide["last_accuracy"] > 0  # a real run, not two empty ones
    phases = wide["num_phases"]
    assert phases == 3
    # The step traces once per program (the scan's shapes of a skipped step's metrics reuse its
    # trace), however many calls and batches a phase takes.
    assert counts[0] == {"loss": phases, "predict": phases}
    assert counts[NUM_CLASSES] == {"loss": programs, "predict": 1}


def test_columns_of_unseen_classes_stay_zero_and_seen_ones_train(tmp_path):
    config = small_config("finetune", capacity=12)  # room beyond the protocol's classes too
    run_lib.run(config, str(tmp_path))
    for phase, num_seen in enumerate((4, 7, 10)):
        _, saved = workdirs.restore(str(tmp_path), phase)
        head = saved.state["params"]["head"]
        assert head["kernel"].shape == (256, 12)
        np.testing.assert_array_equal(np.asarray(head["kernel"])[:, num_seen:], 0)
        np.testing.assert_array_equal(np.asarray(head["bias"])[num_seen:], 0)
        assert np.all(np.abs(np.asarray(head["kernel"])[:, :num_seen]).sum(0) > 0)
    # Evaluating a saved phase masks the classes it had not seen.
    doc = workdirs.evaluate(str(tmp_path), phase=1)
    predicted = {int(p) for row in doc["confusion"].values() for p in row}
    seen = {c["class"] for c in doc["per_class"]}
    assert predicted <= seen and len(seen) == 7


def test_capacity_run_resumes_with_the_same_numbers(tmp_path):
    config = small_config("replay")
    whole = run_lib.run(config, str(tmp_path / "whole"))
    run_lib.run(config, str(tmp_path / "staged"), stop_after=1)
    resumed = run_lib.run(config, str(tmp_path / "staged"))
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["nme_accuracy_matrix"] == whole["nme_accuracy_matrix"]
    assert losses(resumed) == losses(whole)


@pytest.mark.parametrize(
    "method, key, value, message",
    [
        (
            "der",
            None,
            None,
            r"Method 'der' does not support head.capacity.*analytic, bic, coda_prompt, der_pp, dualprompt, er_ace, ewc",
        ),
        ("finetune", "capacity", 8, r"head.capacity=8 is smaller than the protocol's 10 classes"),
    ],
)
def test_capacity_refuses_what_it_cannot_serve(tmp_path, method, key, value, message):
    config = small_config(method)
    if key == "capacity":
        config.head.capacity = value
    with pytest.raises(ValueError, match=message):
        run_lib.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_removing_classes_from_a_capacity_run_gives_the_widened_runs_numbers(tmp_path):
    """Classes removed from a capacity run (one of phase 0, one of phase 1, so not yet learned in
    phase 0's checkpoint) leave the predictions of the same removal from the widening run, and a
    head with a column for every class left, the unseen ones still zero."""
    config = small_config("replay", epochs=1)
    edited = {}
    for capacity in (0, NUM_CLASSES):
        config.head.capacity = capacity
        source, out = str(tmp_path / f"run{capacity}"), str(tmp_path / f"out{capacity}")
        run_lib.run(config, source, stop_after=1)
        order = json.loads((tmp_path / f"run{capacity}" / "results.json").read_text())
        order = order["class_order"]
        workdirs.remove_classes(source, [order[0], order[4]], out)
        edited[capacity] = workdirs.evaluate(out, predictions=True)
    (wide, wide_predictions), (widened, widened_predictions) = edited[NUM_CLASSES], edited[0]
    assert wide["per_class"] == widened["per_class"] and wide["extra"] == widened["extra"]
    for name in ("head", "nme"):
        np.testing.assert_array_equal(wide_predictions[name], widened_predictions[name])
    _, saved = workdirs.restore(str(tmp_path / f"out{NUM_CLASSES}"), 1)
    kernel = np.asarray(saved.state["params"]["head"]["kernel"])
    assert kernel.shape == (256, NUM_CLASSES - 2)
    np.testing.assert_array_equal(kernel[:, 5:], 0)  # 4 + 3 learned, less two removed


def test_a_run_saved_with_the_head_widening_resumes_so_by_default(tmp_path):
    """head.capacity=-1 (the default) resumes a run saved with another width (0: from before
    capacity was the default) with that width, not a refusal of the changed config."""
    whole = run_lib.run(small_config("replay", capacity=0), str(tmp_path / "whole"))
    run_lib.run(small_config("replay", capacity=0), str(tmp_path / "staged"), stop_after=1)
    resumed = run_lib.run(small_config("replay", capacity=-1), str(tmp_path / "staged"))
    assert resumed["config"]["head"]["capacity"] == 0
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert losses(resumed) == losses(whole)

"""config.seeds: the seeds train together under jax.vmap, each with a separate run's numbers."""

import json
import shutil

import numpy as np
import pytest

from configs import digits
from incremental import run as run_lib
from incremental import seeds


def small_config(method, capacity=-1):
    config = digits.get_config(f"method={method}")
    config.head.capacity = capacity  # -1: the protocol's 10 classes for these methods
    config.train.epochs = config.train_first.epochs = 2
    config.protocol.init_classes, config.protocol.increment = 4, 3
    config.log.progress = config.log.plot = False
    return config


@pytest.fixture(scope="module")
def together(tmp_path_factory):
    """`config.seeds=(0, 1)` runs, one per method, made when a test first asks for it."""
    made = {}

    def get(method, capacity=-1):
        if (method, capacity) not in made:
            config = small_config(method, capacity)
            config.seeds = (0, 1)
            workdir = tmp_path_factory.mktemp(f"together_{method}")
            made[method, capacity] = (run_lib.run(config, str(workdir)), workdir)
        return made[method, capacity]

    return get


# finetune, the head widened every phase: every seed trains on the same examples (shared data);
# replay: the exemplar memories differ per seed, and the method state (the memory) is stacked too;
# with a head of every class (the default) each seed's rows are an input, the data shared.
@pytest.mark.parametrize("method, capacity", [("finetune", 0), ("replay", -1)])
def test_each_seed_has_the_numbers_of_its_own_run(tmp_path, together, method, capacity):
    doc, workdir = together(method, capacity)
    assert doc["seeds"] == [0, 1] and doc["complete"]
    lasts = []
    for seed in (0, 1):
        single = small_config(method, capacity)
        single.seed = seed
        alone = run_lib.run(single, str(tmp_path / f"alone_{seed}"))
        seed_doc = json.loads((workdir / f"seed_{seed}" / "results.json").read_text())
        assert seed_doc["accuracy_matrix"] == alone["accuracy_matrix"]
        assert doc["per_seed"][str(seed)]["accuracy_matrix"] == alone["accuracy_matrix"]
        if method == "replay":
            assert seed_doc["nme_accuracy_matrix"] == alone["nme_accuracy_matrix"]
        np.testing.assert_allclose(
            [p["final_loss"] for p in seed_doc["phases"]],
            [p["final_loss"] for p in alone["phases"]],
            rtol=1e-5,
        )
        lasts.append(alone["last_accuracy"])
    assert doc["last_accuracy_mean"] == pytest.approx(np.mean(lasts))
    assert doc["last_accuracy_std"] == pytest.approx(np.std(lasts))
    assert len(set(lasts)) > 1  # the seeds really differ


def test_seeds_resume_after_the_last_phase_every_seed_finished(tmp_path, together):
    whole, workdir = together("replay")
    config = small_config("replay")
    config.seeds = (0, 1)
    staged = tmp_path / "staged"
    shutil.copytree(workdir, staged)  # a finished run, whose latest phases are then lost
    for phase in ("1", "2"):  # seed 1 lost its last two phases, seed 0 its last
        for seed, lost in (("0", ("2",)), ("1", ("1", "2"))):
            if phase in lost:
                path = staged / f"seed_{seed}" / "checkpoints" / "phase" / phase
                for f in sorted(path.rglob("*"), reverse=True):
                    f.unlink() if f.is_file() else f.rmdir()
                path.rmdir()
    resumed = run_lib.run(config, str(staged))
    assert resumed["per_seed"] == whole["per_seed"]


def test_seeds_refuse_within_phase_checkpoints(tmp_path):
    config = small_config("finetune")
    config.seeds = (0, 1)
    config.checkpoint.every_steps = 5
    with pytest.raises(ValueError, match="phase ends only"):
        run_lib.run(config, str(tmp_path))


def test_seeds_with_a_head_of_every_class_compile_the_epoch_once(tmp_path, monkeypatch):
    """The vmapped epoch of `config.seeds` under `head.capacity` traces its step once per run
    however many phases, where widening traces it every phase."""
    from capacity_helpers import counting, trace_counts

    from incremental.methods import METHODS

    cls = counting(METHODS["finetune"])
    monkeypatch.setitem(METHODS, cls.name, cls)
    counts = {}
    for capacity in (0, 10):
        trace_counts.clear()
        config = small_config(cls.name, capacity)
        config.seeds = (0, 1)
        doc = run_lib.run(config, str(tmp_path / str(capacity)))
        counts[capacity] = trace_counts["loss"]
        assert doc["complete"] and len(doc["per_seed"]["0"]["accuracy_matrix"]) == 3
    assert counts == {0: 3, 10: 1}


def test_the_summary_averages_the_scenario_numbers_every_seed_has():
    """Learning accuracy and online accuracy get a mean and std over seeds; forward transfer, None
    where a seed's scenario has no baseline, gets none."""

    def doc(last, learning, online, transfer):
        return {
            "complete": True, "last_accuracy": last, "average_incremental_accuracy": last,
            "forgetting": 0.1, "backward_transfer": -0.1, "accuracy": [last],
            "accuracy_matrix": [[last]], "average_learning_accuracy": learning,
            "average_online_accuracy": online, "forward_transfer": transfer,
        }  # fmt: skip

    summary = seeds.summarize(
        digits.get_config(), [0, 1], [doc(0.5, 0.8, 0.6, None), doc(0.7, 0.9, 0.4, 0.1)]
    )
    assert summary["average_learning_accuracy_mean"] == pytest.approx(0.85)
    assert summary["average_learning_accuracy_std"] == pytest.approx(0.05)
    assert summary["average_online_accuracy_mean"] == pytest.approx(0.5)
    assert "forward_transfer_mean" not in summary
    assert summary["per_seed"]["1"]["forward_transfer"] == 0.1

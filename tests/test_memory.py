import numpy as np
import pytest

from incremental import memory as memory_lib
from incremental.memory import MemoryConfig


def reference_herding(feats, m):
    """iCaRL's herding, written plainly in numpy."""
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    mean = feats.mean(0)
    chosen, running = [], np.zeros_like(mean)
    for k in range(1, m + 1):
        dist = np.linalg.norm(mean[None] - (running[None] + feats) / k, axis=1)
        dist[chosen] = np.inf
        best = int(np.argmin(dist))
        chosen.append(best)
        running += feats[best]
    return np.array(chosen)


@pytest.mark.parametrize("n, d, m", [(30, 5, 7), (100, 16, 20), (9, 3, 9)])
def test_herding_matches_numpy_reference(n, d, m):
    feats = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
    np.testing.assert_array_equal(memory_lib.herding(feats, m), reference_herding(feats, m))


def test_herding_on_hand_made_features_picks_the_mean_matching_exemplars():
    # Unit vectors at 0, 90 and 45 degrees: the class mean points at 45 degrees, so herding picks
    # that one first; the other two tie for the second pick (lowest index wins).
    feats = np.array([[2, 0], [0, 3], [1, 1]], np.float32)
    assert memory_lib.herding(feats, 3).tolist() == [2, 0, 1]
    assert memory_lib.herding(feats, 1).tolist() == [2]


def test_closest_to_mean_and_random_selection():
    feats = np.array([[1, 0], [0, 1], [1, 1], [10, 9]], np.float32)
    assert memory_lib.closest_to_mean(feats, 2).tolist()[0] in (2, 3)
    chosen = memory_lib.select("random", np.zeros((10, 1)), 4, np.random.default_rng(0))
    assert len(set(chosen.tolist())) == 4


def run_updates(cfg, classes_per_phase=2, phases=5, per_class_data=30):
    labels = np.repeat(np.arange(classes_per_phase * phases), per_class_data)
    memory, history = memory_lib.empty(), []
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(labels), 4)).astype(np.float32)
    for p in range(phases):
        lo, hi = p * classes_per_phase, (p + 1) * classes_per_phase
        new = np.flatnonzero((labels >= lo) & (labels < hi))
        memory = memory_lib.update(
            memory,
            cfg,
            new_indices=new,
            new_labels=labels[new],
            feats_fn=lambda i: feats[i],
            num_seen=hi,
            seed=p,
        )
        history.append(memory_lib.counts(memory, hi))
        assert np.all(labels[np.asarray(memory["indices"])] == np.asarray(memory["labels"]))
    return history


def test_fixed_budget_splits_evenly_and_shrinks():
    history = run_updates(MemoryConfig(budget=40, selection="herding"))
    assert [h.tolist() for h in history] == [[20, 20], [10] * 4, [6] * 6, [5] * 8, [4] * 10]


def test_per_class_rule_keeps_a_fixed_number():
    history = run_updates(MemoryConfig(budget=0, per_class=3, selection="random"))
    assert all(h.tolist() == [3] * len(h) for h in history)


def test_reducing_keeps_the_priority_order():
    memory = memory_lib.add(memory_lib.empty(), np.array([5, 3, 9, 1]), np.array([0, 0, 1, 1]))
    reduced = memory_lib.reduce(memory, 1)
    assert np.asarray(reduced["indices"]).tolist() == [5, 9]


def test_bad_memory_configs_are_named():
    with pytest.raises(ValueError, match="selection"):
        MemoryConfig(selection="best")
    with pytest.raises(ValueError, match="smaller than the 10 classes"):
        MemoryConfig(budget=5).per_class_count(10)
    with pytest.raises(ValueError, match="set memory.budget"):
        MemoryConfig(budget=0, per_class=0)

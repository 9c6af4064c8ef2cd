"""Shared by the head.capacity tests: a small digits config, and both heads' runs with trace
counts."""

import dataclasses

from configs import digits
from incremental import run as run_lib
from incremental.methods import METHODS

NUM_CLASSES = 10  # digits


def small_config(method="finetune", *, capacity=NUM_CLASSES, epochs=2):
    """3 phases of 4 + 3 + 3 classes, `epochs` a phase with a decay after the first: the same
    programs in every file that uses it (test_capacity, test_capacity_methods, test_online)."""
    config = digits.get_config(f"method={method}")
    config.train.epochs = config.train_first.epochs = epochs
    config.train.milestones = config.train_first.milestones = (1,)  # a decay inside the phase
    config.protocol.init_classes, config.protocol.increment = 4, 3
    config.log.progress = config.log.plot = False
    config.head.capacity = capacity
    return config


def losses(results):
    return [p["final_loss"] for p in results["phases"]]


trace_counts: dict[str, int] = {}


def _count(name):
    trace_counts[name] = trace_counts.get(name, 0) + 1  # a Python side effect: once per trace


def counting(base):
    """`base` whose loss and predict rule count their traces."""

    @dataclasses.dataclass(frozen=True)
    class Counting(base):
        name = f"counting_{base.name}"

        def loss(self, out, batch, **kwargs):
            _count("loss")
            return super().loss(out, batch, **kwargs)

        def predict(self, out, method_state):
            _count("predict")
            return super().predict(out, method_state)

    return Counting


def run_both_heads(tmp_path, monkeypatch, method, overrides, epochs=2):
    """`method`'s results and trace counts with the head widened (0) and with capacity, by head."""
    cls = counting(METHODS[method])
    monkeypatch.setitem(METHODS, cls.name, cls)
    results, counts = {}, {}
    for capacity in (0, NUM_CLASSES):
        trace_counts.clear()
        config = small_config(cls.name, capacity=capacity, epochs=epochs)
        for key, value in overrides.items():
            section, name = key.split(".")
            config[section][name] = value
        results[capacity] = run_lib.run(config, str(tmp_path / str(capacity)))
        counts[capacity] = dict(trace_counts)
    return results, counts

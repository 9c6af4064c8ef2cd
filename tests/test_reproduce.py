"""The reproduction harness (experiments/reproduce): its table, its summary, and a smoke run of every
entry on tfds mock data (the plumbing, not the numbers)."""

import json
import os
import sys

import ml_collections
import pytest
import tensorflow_datasets as tfds
from absl import flags

sys.path.insert(
    0,
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"),
)

from reproduce import run as harness  # noqa: E402

TARGETS = harness.load_targets()


@pytest.fixture(autouse=True, scope="module")
def parsed_flags():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["test"])


def test_every_entry_is_sourced_and_builds_its_config():
    assert len(TARGETS) >= 10
    for t in TARGETS:
        assert t.source and 0 < t.target < 100 and t.tolerance > 0
        config = harness.config_for(t.method, t.benchmark)
        assert config.method == t.method and config.dataset.name == "tfds:cifar100"
        examples, hours = harness.estimate(config)
        trains = config.train_first.epochs > 0  # SimpleCIL only averages frozen features
        assert (examples > 1e5 and hours > 0) if trains else examples == 0


def test_summary_puts_our_number_beside_the_target(tmp_path):
    t = TARGETS[0]
    workdir = harness.workdir_of(str(tmp_path), t.method, t.benchmark)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"complete": True, t.metric: (t.target + 5) / 100}, f)
    rows = harness.summary(TARGETS, str(tmp_path))
    assert rows[0]["ours"] == pytest.approx(t.target + 5) and rows[0]["diff"] == pytest.approx(5)
    assert rows[0]["within"] is False
    assert all(
        r["ours"] is None for r in rows if (r["method"], r["benchmark"]) != (t.method, t.benchmark)
    )


# The smoke configs of one method are the same on every benchmark (the protocol is shrunk to 2
# phases of 5 classes) but for FOSTER's beta1 (one per phase on B0-Inc10), so one run per method
# covers every entry. The runs are ResNet programs compiled for each method (about 20-40 s each on
# 2 cores): the methods whose entries add a stage of their own run (BiC's bias layer, DER's
# branches, FOSTER's boosting and compression, and RanPAC on a tiny random ViT: a trained phase 0,
# then the ridge head); replay, iCaRL and WA, whose code paths those runs and the digits tests
# cover, are checked up to the run itself (`load.validate` on the mock data: config, method, data,
# protocol and model together). The other pre-trained-model entries run end to end on digits in
# tests/test_pretrained_methods.py, and L2P from its config on mock data in tests/test_configs.py.
SMOKED = ["bic", "der", "foster", "ranpac"]
VALIDATED = sorted({t.method for t in TARGETS} - set(SMOKED))


def smoke_config(method):
    """The shrunk config of the method's entries, after checking that every entry gives it."""
    benchmarks = sorted({t.benchmark for t in TARGETS if t.method == method})
    configs = [harness.config_for(method, b, smoke=True) for b in benchmarks]
    for c in configs[1:]:
        c.protocol.init_classes, c.protocol.increment = (
            configs[0].protocol.init_classes,
            configs[0].protocol.increment,
        )
        if "beta1" in configs[0].method_args:
            args = {**c.method_args.to_dict(), "beta1": configs[0].method_args.beta1}
            c.method_args = ml_collections.ConfigDict(args)
        assert c.to_dict() == configs[0].to_dict()
    return benchmarks[0], configs[0]


def test_the_entries_not_smoke_run_validate_on_mock_data(tmp_path):
    from incremental.phase import load

    with tfds.testing.mock_data(num_examples=1000, policy=tfds.testing.MockPolicy.USE_CODE):
        for method in VALIDATED:
            _, config = smoke_config(method)
            _, protocol, validated = load.validate(config, str(tmp_path / method))
            assert validated.name == method and protocol.num_phases == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", SMOKED)
def test_smoke_run_covers_every_entry_of_the_method(tmp_path, method):
    benchmark, _ = smoke_config(method)
    results = harness.run_one(method, benchmark, smoke=True, root=str(tmp_path))
    assert results["complete"] and results["method"] == method
    for t in TARGETS:
        if t.method == method:
            assert results[t.metric] is not None, t.metric

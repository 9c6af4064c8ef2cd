"""Methods that grow the network (DER, MEMO): accuracy, growth per phase, frozen old branches, resume."""

import jax
import numpy as np
import pytest

from configs import digits
from incremental import methods
from incremental import run as run_lib
from incremental.data import device
from incremental.methods import PhaseContext, PhaseInfo, der
from incremental.phase import load
from incremental.phase import model as phase_model


def small_config(method, epochs=10):
    """3 phases of 4 + 3 + 3 digits: last accuracy finetune 0.289, DER 0.944, MEMO 0.933 (seed 0;
    with digits' 5 phases of 2: 0.200, 0.931, 0.922, at twice the compile time)."""
    config = digits.get_config(f"method={method}")
    config.protocol.init_classes, config.protocol.increment = 4, 3
    config.train.epochs = config.train_first.epochs = epochs
    config.log.progress = config.log.plot = False
    return config


@pytest.fixture(scope="module")
def finetune_last(tmp_path_factory):
    results = run_lib.run(small_config("finetune"), str(tmp_path_factory.mktemp("finetune")))
    return results["last_accuracy"]


_RUNS: dict[str, dict] = {}  # one run of each method's small_config, for the file's tests


def trained(name, tmp_path_factory) -> dict:
    if name not in _RUNS:
        _RUNS[name] = run_lib.run(small_config(name), str(tmp_path_factory.mktemp(name)))
    return _RUNS[name]


@pytest.fixture(scope="module", params=["der", "memo"])
def grown(request, tmp_path_factory):
    return request.param, trained(request.param, tmp_path_factory)


def test_growing_methods_remember(grown, finetune_last):
    name, results = grown
    assert results["last_accuracy"] >= finetune_last + 0.40, (name, results["last_accuracy"])


def test_parameters_grow_by_one_branch_per_phase(grown):
    name, results = grown
    counts = [r["num_params"] for r in results["phases"]]
    backbone = np.array([c["backbone"] for c in counts])
    steps = np.diff(backbone)
    assert (steps > 0).all() and (steps == steps[0]).all(), backbone  # linear in phases
    hidden = small_config(name).model.kwargs.hidden
    if name == "der":  # a whole MLP per phase: 64 inputs -> 256
        assert backbone[0] == steps[0] == 64 * hidden[0] + hidden[0]
    else:  # MEMO copies the last layer only; the shared first layer is counted once
        assert steps[0] == hidden[0] * hidden[1] + hidden[1]
        assert backbone[0] == 64 * hidden[0] + hidden[0] + steps[0]
    # The head spans every branch's features: kernel ((p + 1) * D, C_p) and bias (C_p,).
    dim = hidden[-1]
    seen = [r["num_seen"] for r in results["phases"]]
    expected = [(p + 1) * dim * c + c for p, c in enumerate(seen)]
    assert [c["head"] for c in counts] == expected


def test_old_branches_are_frozen_and_keep_their_features(tmp_path):
    """Phase 1 of DER: branch_0's params and its features on any input are exactly phase 0's."""
    config = small_config("der", epochs=3)
    data, protocol, method = load.validate(config, str(tmp_path))
    first = run_lib.train_phase(config, method, data, protocol, 0, None, method.init_state())
    x = device.normalize(data.x_test[:50], data.norm)
    model0 = phase_model.phase_model(config, method, PhaseInfo(0, 0, 4), final=True)
    feats0 = np.asarray(model0.apply(first.variables, x, train=False)[0])
    old = jax.tree.map(np.array, first.variables["params"]["backbone"]["branch_0"])
    # (phase 1's training donates the carried arrays, hence the copies above)
    second = run_lib.train_phase(config, method, data, protocol, 1, first, first.method_state)
    new = second.variables["params"]["backbone"]
    assert sorted(new) == ["branch_0", "branch_1"] and "aux" not in second.variables["params"]
    jax.tree.map(np.testing.assert_array_equal, old, new["branch_0"])
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new["branch_1"]), strict=True)
    )
    model1 = phase_model.phase_model(config, method, PhaseInfo(1, 4, 3), final=True)
    feats1, _ = model1.apply(second.variables, x, train=False)
    np.testing.assert_array_equal(feats1[:, : feats0.shape[1]], feats0)
    # Weight aligning (PyCIL): the phase ends with the new classes' mean weight norm the old ones'.
    norms = np.linalg.norm(np.asarray(second.variables["params"]["head"]["kernel"]), axis=0)
    assert norms[4:].mean() == pytest.approx(norms[:4].mean(), rel=1e-5)


def test_weight_aligning_scales_only_the_new_columns():
    rng = np.random.default_rng(0)
    head = {"kernel": rng.normal(size=(6, 5)).astype(np.float32), "bias": np.arange(5.0)}
    head["kernel"][:, 3:] *= 4  # new classes' weights grew larger, as they do without memory
    out = der.aligned(head, num_old=3)
    kernel = np.asarray(out["kernel"])
    norms = np.linalg.norm(kernel, axis=0)
    assert norms[3:].mean() == pytest.approx(norms[:3].mean(), rel=1e-6)
    np.testing.assert_array_equal(kernel[:, :3], head["kernel"][:, :3])
    gamma = kernel[:, 3:] / head["kernel"][:, 3:]
    np.testing.assert_allclose(gamma, gamma[0, 0], rtol=1e-6)  # one factor for every new weight
    assert gamma[0, 0] < 0.5
    np.testing.assert_array_equal(np.asarray(out["bias"]), head["bias"])


@pytest.mark.parametrize("old_rows", ["random", "zeros"])
def test_a_new_branchs_head_rows_start_as_pycils_fresh_layer(old_rows):
    """PyCIL's DERNet.update_fc: a fresh kaiming-uniform layer, the old block copied in."""
    dim, num_old = 64, 3
    kernel = np.random.default_rng(1).normal(size=(dim, num_old)).astype(np.float32)
    params = {
        "backbone": {"branch_0": {"w": np.ones((2, dim), np.float32)}},
        "head": {"kernel": kernel, "bias": np.zeros(num_old, np.float32)},
    }
    ctx = PhaseContext(PhaseInfo(1, num_old, 2), None, None, None)
    method = methods.build("der", {"old_rows": old_rows})
    grown = method.grow(ctx, {"params": params, "batch_stats": {}}, jax.random.PRNGKey(0))
    new_kernel = np.asarray(grown["params"]["head"]["kernel"])
    assert new_kernel.shape == (2 * dim, num_old)
    np.testing.assert_array_equal(new_kernel[:dim], kernel)
    rows = new_kernel[dim:]
    if old_rows == "zeros":
        assert not rows.any()
    else:
        bound = np.sqrt(3 / (2 * dim))  # U(-b, b) over the grown width: variance 1 / D
        assert np.abs(rows).max() <= bound and np.abs(rows).max() > 0.8 * bound
        assert rows.std() == pytest.approx(bound / np.sqrt(3), rel=0.15)


def test_growth_resumes_exactly_after_a_phase(tmp_path, tmp_path_factory):
    """Stopped after phase 1 and resumed, DER gives the uninterrupted run's numbers (the same
    config: its programs come from the persistent cache)."""
    whole = trained("der", tmp_path_factory)
    run_lib.run(small_config("der"), str(tmp_path / "staged"), stop_after=1)
    resumed = run_lib.run(small_config("der"), str(tmp_path / "staged"))
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["nme_accuracy_matrix"] == whole["nme_accuracy_matrix"]


def test_memo_needs_a_backbone_that_splits(tmp_path):
    config = small_config("memo")
    config.model.kwargs.hidden = (64,)
    with pytest.raises(ValueError, match="two or more hidden layers"):
        run_lib.run(config, str(tmp_path))

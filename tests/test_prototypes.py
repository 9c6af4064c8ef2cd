"""Methods that classify frozen features in closed form: nearest class mean and analytic (ACIL)."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from incremental import checkpoint, methods, train
from incremental import run as run_lib
from incremental.methods import Outputs, PhaseContext, PhaseInfo
from incremental.methods.analytic import Analytic, expand
from incremental.methods.ncm import NCM
from incremental.phase import load, save
from incremental.phase import model as phase_model

EPOCHS = 4


def config_for(method, **method_args):
    config = digits.get_config(f"method={method}")
    config.log.progress = config.log.plot = False
    config.train.epochs = config.train_first.epochs = EPOCHS
    config.train.milestones = config.train_first.milestones = (EPOCHS - 1,)
    config.method_args.update(method_args)
    return config


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One uninterrupted digits run (5 phases of 2 classes) of each method, shared below."""
    out = {}
    for method in ("finetune", "analytic", "ncm"):
        workdir = str(tmp_path_factory.mktemp(method))
        out[method] = (run_lib.run(config_for(method), workdir), workdir)
    return out


def ridge(h, labels, num_classes, gamma):
    """The ridge regression of one-hot labels on features h, in float64."""
    h = np.asarray(h, np.float64)
    gram = h.T @ h + gamma * np.eye(h.shape[1])
    return np.linalg.solve(gram, h.T @ np.eye(num_classes)[labels])


def synthetic_phases(method, sizes, feats, labels):
    """Runs the method's end-of-phase hook over phases of `sizes` classes; features are the inputs."""
    state, seen = method.init_state(), 0
    states = []
    for phase, size in enumerate(sizes):
        info = PhaseInfo(phase, seen, size)
        ctx = PhaseContext(info, labels, feats, lambda variables, x: x)
        head = {"kernel": np.zeros((1, seen + size), np.float32)}  # only its width is read
        state = method.end_phase(ctx, {"params": {"head": head}}, state)
        states.append(state)
        seen += size
    return states


def relative_error(got, want):
    return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)


@pytest.mark.parametrize("expansion", [0, 64])
def test_analytic_recursion_equals_the_joint_ridge_solution_on_synthetic_features(expansion):
    rng = np.random.default_rng(0)
    sizes = (3, 2, 1, 3)
    labels = rng.integers(0, sum(sizes), 900).astype(np.int32)
    centers = rng.normal(size=(sum(sizes), 24))
    feats = (centers[labels] + rng.normal(size=(900, 24))).astype(np.float32)
    method = Analytic(gamma=1.0, expansion=expansion)
    seen = np.cumsum(sizes)
    for num_seen, state in zip(seen, synthetic_phases(method, sizes, feats, labels), strict=True):
        old = labels < num_seen
        h = expand(jnp.asarray(feats[old]), state)
        want = ridge(h, labels[old], num_seen, 1.0)
        assert state["weight"].shape == (h.shape[1], num_seen)
        assert relative_error(state["weight"], want) < 2e-5
        inverse = np.linalg.inv(np.asarray(h, np.float64).T @ h + np.eye(h.shape[1]))
        assert relative_error(state["inverse_gram"], inverse) < 2e-5
    assert ("projection" in state) == bool(expansion)


def test_analytic_head_is_the_joint_ridge_solution_on_digits(results):
    result, workdir = results["analytic"]
    config = config_for("analytic")
    data, protocol, _ = load.load_data(config)
    method = methods.build("analytic", config.method_args)
    ckpts = checkpoint.Checkpoints(workdir)
    target = save.state_target(config, method, protocol, data, 4)
    state, method_state, _ = ckpts.restore(4, target)
    ckpts.close()
    model = phase_model.make_model(config, 10)
    embed = train.make_apply_batches(model, data.norm, lambda out, _: out.features)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    feats = train.run_batched(embed, variables, {}, data.x_train, 500)
    h = expand(jnp.asarray(feats), method_state)
    want = ridge(h, data.y_train, 10, method.gamma)
    assert method_state["weight"].shape == (method.expansion, 10)
    # All-at-once float64 against five float32 recursions of a system with condition number ~1e6.
    assert relative_error(method_state["weight"], want) < 1e-2
    assert result["last_accuracy"] >= 0.9


def test_ncm_means_and_predictions_match_numpy():
    rng = np.random.default_rng(1)
    sizes = (3, 2)
    labels = rng.permutation(np.arange(250) % 5).astype(np.int32)
    feats = rng.normal(size=(250, 8)).astype(np.float32) + labels[:, None]
    state = synthetic_phases(NCM(), sizes, feats, labels)[-1]
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    means = np.stack([unit[labels == c].mean(0) for c in range(5)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    np.testing.assert_allclose(state["class_means"], means, atol=1e-6)

    test = rng.normal(size=(64, 8)).astype(np.float32) * 3
    scores = NCM().predict(Outputs(jnp.asarray(test), jnp.zeros((64, 5))), state)
    cosine = (test / np.linalg.norm(test, axis=1, keepdims=True)) @ means.T
    np.testing.assert_allclose(scores, cosine, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(scores, 1), np.argmax(cosine, 1))


def test_closed_form_heads_beat_finetune_on_digits(results):
    finetune = results["finetune"][0]["last_accuracy"]
    assert results["analytic"][0]["last_accuracy"] >= finetune + 0.3
    assert results["ncm"][0]["last_accuracy"] >= finetune + 0.3
    for method in ("analytic", "ncm"):  # later phases take no step
        assert [p["epochs"] for p in results[method][0]["phases"]] == [EPOCHS, 0, 0, 0, 0]


@pytest.mark.parametrize("method", ["analytic", "ncm"])
def test_resume_after_phase_2_gives_the_same_numbers(results, tmp_path, method):
    whole, _ = results[method]
    config = config_for(method)
    partial = run_lib.run(config, str(tmp_path), stop_after=2)
    assert len(partial["accuracy_matrix"]) == 3
    resumed = run_lib.run(config, str(tmp_path))
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["task_aware_matrix"] == whole["task_aware_matrix"]


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="gamma"):
        Analytic(gamma=0.0)
    with pytest.raises(ValueError, match="expansion"):
        Analytic(expansion=-1)
    labels = np.zeros(10, np.int32)  # class 1 of the phase has no example
    with pytest.raises(ValueError, match="needs training examples"):
        synthetic_phases(NCM(), (2,), np.ones((10, 4), np.float32), labels)

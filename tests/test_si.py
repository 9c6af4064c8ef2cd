"""SI: the path integral, its penalty, and widening of the importances."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from configs import digits
from incremental import run as run_lib
from incremental import surgery, train
from incremental.data import device, sources
from incremental.methods import PhaseContext, PhaseInfo, PhaseSetup
from incremental.methods.si import SI
from incremental.phase import model as phase_model


def config_for(method, epochs):
    config = digits.get_config(f"method={method}")
    config.log.progress = config.log.plot = False
    config.train.epochs = config.train_first.epochs = epochs
    config.train.milestones = config.train_first.milestones = (epochs - 1,)
    return config


def context(phase, num_old, num_new):
    return PhaseContext(PhaseInfo(phase, num_old, num_new), None, None, None)


def sgd_on_quadratic(method, state, theta0, *, a, b, lr, steps):
    """`steps` plain SGD steps on ½a(θ−b)² plus SI's penalty, calling `step_update` after each."""

    def total_loss(params, state):
        return 0.5 * a * jnp.sum((params["w"] - b) ** 2) + method.penalty(params, state)

    def step(carry, _):
        params, state = carry
        grads = jax.grad(total_loss)(params, state)
        new = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        state = method.step_update(state, params_before=params, params_after=new, grads=grads)
        return (new, state), new["w"][0]

    run = jax.jit(lambda params, state: jax.lax.scan(step, (params, state), None, length=steps))
    (params, state), path = run({"w": jnp.array([theta0], jnp.float32)}, state)
    return params, state, np.concatenate([[theta0], np.asarray(path, np.float64)])


def test_path_integral_matches_the_closed_form_on_a_quadratic():
    a, b, lr, theta0, steps = 2.0, 1.5, 0.1, -0.5, 25
    method = SI(damping=0.1)
    params0 = {"w": jnp.array([theta0], jnp.float32)}
    state = method.begin_phase(context(0, 0, 2), {"params": params0}, {})
    params, state, _ = sgd_on_quadratic(method, state, theta0, a=a, b=b, lr=lr, steps=steps)
    # g_k = a(θ_k − b) = a r^k (θ_0 − b) with r = 1 − ηa, Δθ_k = −η g_k, so ω = Σ η g_k² is geometric.
    r = 1.0 - lr * a
    omega = lr * a**2 * (theta0 - b) ** 2 * (1 - r ** (2 * steps)) / (1 - r**2)
    np.testing.assert_allclose(float(state["omega"]["w"][0]), omega, rtol=1e-5)
    moved = (theta0 - b) * (r**steps - 1.0)
    final = method.end_phase(context(0, 0, 2), {"params": params}, state)
    np.testing.assert_allclose(
        float(final["importance"]["w"][0]), omega / (moved**2 + 0.1), rtol=1e-5
    )
    np.testing.assert_array_equal(final["anchor"]["w"], params["w"])
    assert set(final) == {"importance", "anchor"}


def test_path_integral_ignores_the_penalty_gradient():
    a, b, lr, theta0, steps = 2.0, 1.5, 0.05, 0.3, 40
    method = SI(strength=0.5)
    prev = {"importance": {"w": jnp.array([3.0])}, "anchor": {"w": jnp.array([-1.0])}}
    params0 = {"w": jnp.array([theta0], jnp.float32)}
    state = method.begin_phase(context(1, 2, 0), {"params": params0}, prev)
    _, state, path = sgd_on_quadratic(method, state, theta0, a=a, b=b, lr=lr, steps=steps)
    # The trajectory follows the total gradient; the integral uses only the quadratic's own gradient.
    expected = np.sum(-a * (path[:-1] - b) * np.diff(path))
    with_penalty = np.sum(
        -(a * (path[:-1] - b) + 2 * 0.5 * 3.0 * (path[:-1] + 1.0)) * np.diff(path)
    )
    assert abs(expected - with_penalty) > 0.1 * abs(expected)  # the test can tell them apart
    np.testing.assert_allclose(float(state["omega"]["w"][0]), expected, rtol=1e-4)


def tiny_model_and_data():
    source = sources.load_source("digits")
    keep = source.y_train < 4
    x, y = source.x_train[keep][:96], source.y_train[keep][:96].astype(np.int32)
    config = digits.get_config("method=si")
    config.model.kwargs.hidden = (16,)
    model = phase_model.make_model(config, 4)
    variables = phase_model.init_variables(model, x[0], jax.random.PRNGKey(0))
    return model, variables, x, y, device.fit_normalizer(source.x_train, source.is_image)


def test_path_integral_inside_the_jitted_train_epoch():
    """One full-batch SGD step of phase 1: ω = −g_ce · Δθ, with g_ce the gradient of the plain CE."""
    model, variables, x, y, norm = tiny_model_and_data()
    method, info, lr = SI(strength=2.0), PhaseInfo(1, 2, 2), 0.5
    params = variables["params"]
    key = jax.random.PRNGKey(1)
    prev = {
        "importance": jax.tree.map(lambda p: jax.random.uniform(key, p.shape), params),
        "anchor": jax.tree.map(lambda p: p + 0.3 * jax.random.normal(key, p.shape), params),
    }
    state = method.begin_phase(context(1, 2, 0), variables, prev)

    def ce(params):
        _, logits = model.apply({"params": params}, device.normalize(x, norm), train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    g_ce = jax.grad(ce)(params)
    train_epoch = train.make_train_epoch(
        model=model,
        tx=optax.sgd(lr),
        method=method,
        info=info,
        setup=PhaseSetup(),
        norm=norm,
        batch_size=len(x),
    )
    before = jax.tree.map(jnp.array, params)
    opt = optax.sgd(lr).init(params)
    ts = train.TrainState(before, {}, opt, jax.random.PRNGKey(2), jnp.zeros((), jnp.int32))
    ts, state, metrics = train_epoch(ts, state, jnp.asarray(x), jnp.asarray(y))
    assert float(metrics["penalty"][0]) > 0.01
    delta = ravel_pytree(ts.params)[0] - ravel_pytree(params)[0]
    g_ce, importance = ravel_pytree(g_ce)[0], ravel_pytree(state["importance"])[0]
    offset = ravel_pytree(params)[0] - ravel_pytree(state["anchor"])[0]
    expected = -g_ce * delta
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(ravel_pytree(state["omega"])[0], expected, atol=1e-4 * scale)
    # Using the total loss's gradient instead would be visibly different.
    wrong = expected - 2 * method.strength * importance * offset * delta
    assert float(jnp.abs(wrong - expected).max()) > 0.1 * scale


def test_penalty_is_zero_at_the_anchor():
    _, variables, *_ = tiny_model_and_data()
    params = variables["params"]
    method = SI(strength=3.0)
    ones = jax.tree.map(jnp.ones_like, params)
    state = method.begin_phase(context(1, 4, 0), variables, {"importance": ones, "anchor": params})
    assert float(method.penalty(params, state)) == 0.0
    shifted = jax.tree.map(lambda p: p + 0.1, params)
    count = sum(p.size for p in jax.tree.leaves(params))
    np.testing.assert_allclose(float(method.penalty(shifted, state)), 3.0 * 0.01 * count, rtol=1e-3)


def test_widening_gives_new_head_columns_zero_importance():
    _, variables, *_ = tiny_model_and_data()
    method = SI()
    prev = {
        "importance": jax.tree.map(lambda p: jnp.full_like(p, 2.0), variables["params"]),
        "anchor": variables["params"],
    }
    params = surgery.widen_head(variables["params"], 3, jax.random.PRNGKey(0))
    state = method.begin_phase(context(1, 4, 3), {"params": params}, prev)
    head = state["importance"]["head"]
    assert head["kernel"].shape == (16, 7) and head["bias"].shape == (7,)
    np.testing.assert_array_equal(head["kernel"][:, 4:], 0.0)
    np.testing.assert_array_equal(head["bias"][4:], 0.0)
    np.testing.assert_array_equal(head["kernel"][:, :4], 2.0)
    for name in ("anchor", "omega", "start"):
        shapes = jax.tree.map(jnp.shape, state[name])
        assert shapes == jax.tree.map(jnp.shape, params), name
    np.testing.assert_array_equal(state["start"]["head"]["kernel"], params["head"]["kernel"])


def test_si_runs_and_resumes_exactly(tmp_path):
    config = config_for("si", epochs=2)
    config.protocol.init_classes, config.protocol.increment = 4, 3  # 3 phases keep it short
    whole = run_lib.run(config, str(tmp_path / "whole"))
    run_lib.run(config, str(tmp_path / "staged"), stop_after=1)
    resumed = run_lib.run(config, str(tmp_path / "staged"))
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert [p["final_loss"] for p in resumed["phases"]] == [
        p["final_loss"] for p in whole["phases"]
    ]

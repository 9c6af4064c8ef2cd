import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from incremental import surgery
from incremental.models import build_model, head_logits


@settings(deadline=None, max_examples=12)
@given(
    dim=st.integers(1, 48),
    num_old=st.integers(1, 20),
    num_new=st.integers(0, 12),
    init=st.sampled_from(["default", "zeros", "imprint"]),
    seed=st.integers(0, 2**16),
)
def test_widen_head_keeps_old_logits_bit_identical(dim, num_old, num_new, init, seed):
    # Host-side draws: eager jax.random compiles a sampler for every new shape (about 0.5 s each).
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    params = {
        "backbone": {"w": normal(3, dim)},
        "head": {"kernel": normal(dim, num_old), "bias": normal(num_old)},
    }
    means = normal(num_new, dim) if init == "imprint" else None
    wide = surgery.widen_head(params, num_new, jax.random.PRNGKey(seed), init, class_means=means)
    feats = normal(7, dim)
    before, after = head_logits(feats, params["head"]), head_logits(feats, wide["head"])
    assert after.shape == (7, num_old + num_new)
    np.testing.assert_array_equal(np.asarray(after[:, :num_old]), np.asarray(before))
    np.testing.assert_array_equal(np.asarray(wide["head"]["bias"][num_old:]), 0)
    assert wide["backbone"] is params["backbone"]  # untouched subtrees are shared, not copied


@pytest.mark.parametrize(
    "name, kwargs, shape", [("mlp", {"hidden": (16,)}, (8, 8, 1)), ("convnet", {}, (8, 8, 1))]
)
def test_widened_model_gives_bit_identical_old_logits(name, kwargs, shape, key):
    x = jax.random.normal(key, (5, *shape))
    model = build_model(name, 3, **kwargs)
    variables = model.init(key, x, train=False)
    wide_params = surgery.widen_head(variables["params"], 2, key)
    wide_model = build_model(name, 5, **kwargs)
    _, old = model.apply(variables, x, train=False)
    _, new = wide_model.apply({**variables, "params": wide_params}, x, train=False)
    np.testing.assert_array_equal(np.asarray(new[:, :3]), np.asarray(old))


def test_default_init_is_the_layers_own_initialiser(key):
    params = {"head": {"kernel": jnp.zeros((512, 1)), "bias": jnp.zeros(1)}}
    new = surgery.widen_head(params, 400, key)["head"]["kernel"][:, 1:]
    assert abs(float(new.std()) - (1 / 512) ** 0.5) < 0.01  # lecun normal: std = 1/sqrt(fan_in)
    dense = nn.initializers.lecun_normal()(key, (512, 400))  # drawn as a row, the same numbers
    np.testing.assert_array_equal(
        np.asarray(new).view(np.uint32), np.asarray(dense).view(np.uint32)
    )


def test_imprint_uses_normalised_class_means(key):
    params = {"head": {"kernel": 2 * jnp.eye(3)[:, :2], "bias": jnp.zeros(2)}}
    means = jnp.array([[0.0, 0.0, 5.0]])
    new = surgery.widen_head(params, 1, key, "imprint", class_means=means)["head"]["kernel"]
    np.testing.assert_allclose(np.asarray(new[:, 2]), [0, 0, 2.0])


def test_widen_head_rejects_bad_input(key):
    params = {"head": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)}}
    with pytest.raises(ValueError, match="Unknown head init"):
        surgery.widen_head(params, 1, key, "orthogonal")
    with pytest.raises(ValueError, match="class_means"):
        surgery.widen_head(params, 1, key, "imprint")
    with pytest.raises(ValueError, match="params\\['head'\\]\\['kernel'\\]"):
        surgery.widen_head({"w": jnp.zeros(2)}, 1, key)


@pytest.mark.parametrize(
    "make_tx", [lambda: optax.adam(1e-2), lambda: optax.sgd(1e-2, momentum=0.9)]
)
def test_widen_like_widens_optimizer_moments_with_zeros(make_tx, key):
    params = {
        "backbone": {"w": jnp.ones((3, 4))},
        "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
    }
    tx = make_tx()
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    wide_params = surgery.widen_head(params, 3, key)
    wide_state = surgery.widen_like(opt_state, 3)
    fresh = tx.init(wide_params)
    assert jax.tree.structure(wide_state) == jax.tree.structure(fresh)
    for got, want in zip(jax.tree.leaves(wide_state), jax.tree.leaves(fresh), strict=True):
        assert got.shape == want.shape
    moments = [
        leaf for leaf in jax.tree.leaves(wide_state) if leaf.ndim >= 1 and leaf.shape[-1] == 5
    ]
    assert moments, "the head moments were not widened"
    for leaf in moments:
        np.testing.assert_array_equal(np.asarray(leaf[..., 2:]), 0)  # new columns: zero moments
        assert np.all(np.asarray(leaf[..., :2]) != 0)  # old columns keep their moments
    tx.update(jax.tree.map(jnp.ones_like, wide_params), wide_state, wide_params)  # usable as is


def test_freeze_rules_and_head_columns(key):
    params = {
        "backbone": {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones(2)}},
        "head": {"kernel": jnp.ones((2, 4)), "bias": jnp.ones(4)},
    }
    labels = surgery.freeze_labels(params, [("backbone/a/.*", True), ("backbone/.*", False)])
    assert labels["backbone"]["a"]["kernel"] == "frozen"
    assert labels["backbone"]["b"]["kernel"] == "trainable"
    assert labels["head"]["kernel"] == "trainable"
    tx = optax.chain(
        surgery.freeze(optax.sgd(0.1), params, [("backbone/a/.*", True)]),
        surgery.freeze_head_columns(3),
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["backbone"]["a"]["kernel"]), 0)
    assert np.all(np.asarray(updates["backbone"]["b"]["kernel"]) != 0)
    np.testing.assert_array_equal(np.asarray(updates["head"]["kernel"][:, :3]), 0)
    assert np.all(np.asarray(updates["head"]["kernel"][:, 3]) != 0)
    np.testing.assert_array_equal(np.asarray(updates["head"]["bias"][:3]), 0)


def test_select_and_map_paths():
    tree = {"backbone": {"conv": {"kernel": jnp.ones(2)}}, "head": {"kernel": jnp.ones(3)}}
    assert set(surgery.select(tree, ".*kernel")) == {"backbone/conv/kernel", "head/kernel"}
    doubled = surgery.map_paths(lambda x: 2 * x, tree, "head/.*")
    np.testing.assert_array_equal(np.asarray(doubled["head"]["kernel"]), 2)
    assert doubled["backbone"]["conv"]["kernel"] is tree["backbone"]["conv"]["kernel"]


def test_widen_cosine_head_keeps_old_logits_and_scale(key):
    x = jax.random.normal(key, (6, 8, 8, 1))
    model = build_model("mlp", 3, head="cosine", hidden=(16,))
    variables = model.init(key, x, train=False)
    assert set(variables["params"]["head"]) == {"kernel", "sigma"}
    wide = surgery.widen_head(variables["params"], 2, key)
    assert wide["head"]["sigma"] is variables["params"]["head"]["sigma"]
    _, old = model.apply(variables, x, train=False)
    _, new = build_model("mlp", 5, head="cosine", hidden=(16,)).apply(
        {"params": wide}, x, train=False
    )
    np.testing.assert_array_equal(np.asarray(new[:, :3]), np.asarray(old))
    assert float(jnp.abs(new).max()) <= float(variables["params"]["head"]["sigma"]) + 1e-6

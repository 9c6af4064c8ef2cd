"""The public surgery API: removing classes, grafting (from disk too), branches, freezing, summaries."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from incremental import surgery
from incremental.models import Head, build_model


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_docstring_examples_run():
    result = doctest.testmod(surgery, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 30
    assert result.failed == 0


@pytest.mark.parametrize(
    "num_classes, removed",
    [(10, [2, 5]), (10, [0]), (10, [9]), (200, [0, 3, 127, 128, 199])],  # 200: across a block
)
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_remove_classes_keeps_other_logits_bit_identical(num_classes, removed, head, key):
    x = jax.random.normal(key, (6, 8, 8, 1))
    model = build_model("mlp", num_classes, head=head, hidden=(16,))
    params = model.init(key, x, train=False)["params"]
    params = {**params, "head": {**params["head"]}}
    if "bias" in params["head"]:  # a trained head has a non-zero bias
        params["head"]["bias"] = jax.random.normal(key, (num_classes,))
    small = surgery.remove_classes(params, removed)
    kept = np.setdiff1d(np.arange(num_classes), removed)
    _, before = model.apply({"params": params}, x, train=False)
    small_model = build_model("mlp", len(kept), head=head, hidden=(16,))
    _, after = small_model.apply({"params": small}, x, train=False)
    assert after.shape == (6, len(kept))
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before)[:, kept])
    assert small["backbone"] is params["backbone"]


def test_remove_classes_like_matches_a_fresh_optimizer_state(key):
    params = {"backbone": {"w": jnp.ones((3, 4))}, "head": {"kernel": jnp.ones((4, 5))}}
    params["head"]["bias"] = jnp.arange(5.0)
    tx = optax.adam(1e-2)
    grads = {**params, "head": {"kernel": jnp.ones((4, 5)), "bias": jnp.arange(5.0) + 1}}
    _, state = tx.update(grads, tx.init(params), params)
    small_state = surgery.remove_classes_like(state, [1, 3], 5)
    small_params = surgery.remove_classes(params, [1, 3])
    fresh = tx.init(small_params)
    assert jax.tree.structure(small_state) == jax.tree.structure(fresh)
    assert jax.tree.map(jnp.shape, small_state) == jax.tree.map(jnp.shape, fresh)
    mu_bias = np.asarray(state[0].mu["head"]["bias"])
    np.testing.assert_array_equal(np.asarray(small_state[0].mu["head"]["bias"]), mu_bias[[0, 2, 4]])
    tx.update(jax.tree.map(jnp.ones_like, small_params), small_state, small_params)  # usable


def test_remove_then_widen_is_the_identity_on_kept_columns(key):
    params = {"head": {"kernel": jax.random.normal(key, (3, 4)), "bias": jnp.arange(4.0)}}
    round_trip = surgery.widen_head(surgery.remove_classes(params, [3]), 1, key, "zeros")
    np.testing.assert_array_equal(
        np.asarray(round_trip["head"]["kernel"][:, :3]), np.asarray(params["head"]["kernel"][:, :3])
    )


@pytest.mark.parametrize(
    "classes, message",
    [
        ([5], "out of range"),
        ([-1], "out of range"),
        ([1, 1], "repeated"),
        ([0, 1, 2, 3, 4], "empty"),
    ],
)
def test_remove_classes_rejects_bad_classes(classes, message):
    params = {"head": {"kernel": jnp.ones((2, 5)), "bias": jnp.ones(5)}}
    with pytest.raises(ValueError, match=message):
        surgery.remove_classes(params, classes)
    with pytest.raises(ValueError, match=message):
        surgery.remove_classes_like(params, classes, 5)


def test_remove_classes_rejects_non_integer_classes():
    with pytest.raises(TypeError, match="integers"):
        surgery.remove_classes({"head": {"kernel": jnp.ones((2, 5))}}, [1.5])


def test_remove_classes_like_rejects_a_head_of_another_width():
    with pytest.raises(ValueError, match="not the 4 classes"):
        surgery.remove_classes_like({"head": {"kernel": jnp.ones((2, 5))}}, [0], 4)


def tree(seed, num_classes=3):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "backbone": {"conv": {"kernel": jax.random.normal(k1, (3, 4))}, "scale": jnp.ones(4)},
        "head": {"kernel": jax.random.normal(k2, (4, num_classes)), "bias": jnp.zeros(num_classes)},
        "steps": jax.random.randint(k3, (2,), 0, 9),
    }


def test_graft_copies_exactly_the_matching_leaves():
    dst, src = tree(0), tree(1, num_classes=7)
    out = surgery.graft(dst, src, "backbone/.*")
    assert_trees_equal(out["backbone"], src["backbone"])
    assert out["head"]["kernel"] is dst["head"]["kernel"]  # other leaves are shared, not copied
    assert_trees_equal(dst, tree(0))  # the input is untouched
    replaced = surgery.replace(dst, "steps", {"steps": jnp.array([7, 8])})
    assert replaced["steps"].tolist() == [7, 8]


@pytest.mark.parametrize(
    "call",
    [
        lambda: surgery.graft(tree(0), tree(1), "body/.*"),
        lambda: surgery.replace(tree(0), "backbone", {"backbone": jnp.ones(1)}),
        lambda: surgery.select(tree(0), "conv/kernel", strict=True),  # must match a whole path
        lambda: surgery.freeze(optax.sgd(0.1), tree(0), [("body/.*", True)]),
        lambda: surgery.freeze(
            optax.sgd(0.1), tree(0), [("backbone/.*", True), ("body/.*", True)], strict=True
        ),
    ],
)
def test_a_pattern_that_matches_nothing_raises(call):
    with pytest.raises(ValueError, match="matches no leaf path"):
        call()


def test_graft_and_replace_name_the_misfit():
    with pytest.raises(ValueError, match=r"'head/kernel' is \(4, 3\) float32 .* \(4, 7\) float32"):
        surgery.graft(tree(0), tree(1, num_classes=7), "head/.*")
    with pytest.raises(ValueError, match="int32"):
        surgery.replace(tree(0), "steps", {"steps": jnp.zeros(2)})
    with pytest.raises(ValueError, match="source lacks"):
        surgery.replace(tree(0), "backbone/.*", {"backbone/scale": jnp.ones(4)})
    with pytest.raises(ValueError, match="does not match"):
        surgery.replace(tree(0), "steps", {"steps": jnp.zeros(2, jnp.int32), "x": jnp.ones(1)})


def test_graft_from_a_standard_checkpoint_gives_exactly_the_saved_arrays(tmp_path, monkeypatch):
    saved = tree(1, num_classes=7)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "params", saved)
    read = []  # names of the arrays read from disk
    deserialize = ocp.type_handlers.NumpyHandler.deserialize

    async def spy(self, infos, args=None):
        read.extend(info.name for info in infos)
        return await deserialize(self, infos, args)

    monkeypatch.setattr(ocp.type_handlers.NumpyHandler, "deserialize", spy)
    fresh = tree(0)
    out = surgery.graft_from_checkpoint(fresh, tmp_path / "params", "backbone/.*")
    assert_trees_equal(out["backbone"], saved["backbone"])
    assert out["head"]["kernel"] is fresh["head"]["kernel"] and out["steps"] is fresh["steps"]
    assert sorted(read) == ["backbone.conv.kernel", "backbone.scale"]  # nothing else was read


def test_graft_from_a_work_directory_reads_the_newest_phase_or_the_given_one(tmp_path):
    directory = tmp_path / "checkpoints" / "phase"
    states = [{"params": tree(seed), "rng": jax.random.PRNGKey(seed)} for seed in (1, 2)]
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
        for phase, state in enumerate(states):
            args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave({})}
            manager.save(phase, args=ocp.args.Composite(**args))
    fresh = tree(0)
    newest = surgery.graft_from_checkpoint(fresh, tmp_path, "backbone/.*|head/.*")
    assert_trees_equal(newest["backbone"], states[1]["params"]["backbone"])
    assert_trees_equal(newest["head"], states[1]["params"]["head"])
    first = surgery.graft_from_checkpoint(fresh, tmp_path, "backbone/.*", step=0)
    assert_trees_equal(first["backbone"], states[0]["params"]["backbone"])
    rng = surgery.graft_from_checkpoint(
        {"rng": jnp.zeros(2, jnp.uint32)}, directory, "rng", subtree=""
    )
    assert_trees_equal(rng["rng"], states[1]["rng"])
    with pytest.raises(ValueError, match="no step 5"):
        surgery.graft_from_checkpoint(fresh, tmp_path, "backbone/.*", step=5)
    with pytest.raises(ValueError, match="matches no leaf path"):
        surgery.graft_from_checkpoint(fresh, tmp_path, "body/.*")
    with pytest.raises(ValueError, match=r"'head/kernel' is \(4, 5\) float32 .* \(4, 3\) float32"):
        surgery.graft_from_checkpoint(tree(0, num_classes=5), tmp_path, "head/kernel")
    with pytest.raises(ValueError, match="not an orbax pytree checkpoint"):
        surgery.graft_from_checkpoint(fresh, tmp_path / "checkpoints", "backbone/.*")


class Branch(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(self.width)(x.reshape((x.shape[0], -1))))


class Branched(nn.Module):
    """Branches side by side, features concatenated in branch order (the add_branch layout)."""

    num_branches: int
    width: int = 8

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [Branch(self.width, name=f"branch_{i}")(x) for i in range(self.num_branches)], axis=-1
        )


class BranchedClassifier(nn.Module):
    num_branches: int
    num_classes: int

    @nn.compact
    def __call__(self, x):
        features = Branched(self.num_branches, name="backbone")(x)
        return features, Head(self.num_classes, name="head")(features)


def test_graft_checks_the_checksums_of_the_leaves_it_reads(tmp_path, monkeypatch):
    """A work directory's checkpoint carries a checksum per array: a graft of a leaf whose saved
    bytes no longer match is refused, naming it; the other leaves still graft (from a path
    relative to the current directory, too)."""
    import json

    from incremental import checkpoint

    state = {"params": tree(1), "rng": jax.random.PRNGKey(1)}
    ckpts = checkpoint.Checkpoints(str(tmp_path))
    ckpts.save(0, state, {}, {"phase": 0})
    ckpts.close()
    meta_file = tmp_path / "checkpoints" / "phase" / "0" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert "state/params/head/bias" in meta["checksums"]
    meta["checksums"]["state/params/head/bias"] ^= 1  # as if the saved bias had changed
    meta["checksums"]["meta"] = checkpoint._meta_checksum(meta)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="state/params/head/bias"):
        surgery.graft_from_checkpoint(tree(0), tmp_path, "head/.*")
    monkeypatch.chdir(tmp_path.parent)
    grafted = surgery.graft_from_checkpoint(tree(0), tmp_path.name, "backbone/.*")
    assert_trees_equal(grafted["backbone"], state["params"]["backbone"])


def test_add_branch_keeps_old_features_and_the_old_branch_frozen(key):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4, 4)), jnp.float32)
    one = BranchedClassifier(1, 3)
    params = one.init(key, x)["params"]
    fresh = BranchedClassifier(2, 3).init(jax.random.PRNGKey(7), x)["params"]
    grown = surgery.add_branch(params, feature_dim=8, branch=fresh["backbone"]["branch_1"])
    assert jax.tree.map(jnp.shape, grown) == jax.tree.map(jnp.shape, fresh)
    two = BranchedClassifier(2, 3)
    features, logits = one.apply({"params": params}, x)
    new_features, new_logits = two.apply({"params": grown}, x)
    np.testing.assert_array_equal(np.asarray(new_features[:, :8]), np.asarray(features))
    np.testing.assert_allclose(np.asarray(new_logits), np.asarray(logits), rtol=1e-6, atol=1e-6)

    tx = surgery.freeze(optax.sgd(0.1), grown, [("backbone/branch_0/.*", True)])
    loss = lambda p: jnp.sum(two.apply({"params": p}, x)[1] ** 2)
    stepped, opt_state = grown, tx.init(grown)
    for _ in range(2):  # the zero head rows learn first; the new branch moves from step two
        updates, opt_state = tx.update(jax.grad(loss)(stepped), opt_state, stepped)
        stepped = optax.apply_updates(stepped, updates)
    assert_trees_equal(stepped["backbone"]["branch_0"], grown["backbone"]["branch_0"])
    moved = stepped["backbone"]["branch_1"]["Dense_0"]["kernel"]
    assert np.any(
        np.asarray(moved) != np.asarray(grown["backbone"]["branch_1"]["Dense_0"]["kernel"])
    )


def test_add_branch_copies_the_last_branch_by_default(key):
    params = BranchedClassifier(1, 3).init(key, jnp.ones((2, 4)))["params"]
    grown = surgery.add_branch(params, feature_dim=8)
    assert_trees_equal(grown["backbone"]["branch_1"], params["backbone"]["branch_0"])
    kernel = grown["backbone"]["branch_1"]["Dense_0"]["kernel"]
    assert kernel is not params["backbone"]["branch_0"]["Dense_0"]["kernel"]  # a copy, not an alias
    np.testing.assert_array_equal(np.asarray(grown["head"]["kernel"][8:]), 0)


def test_add_branch_like_matches_a_fresh_optimizer_state(key):
    params = BranchedClassifier(1, 3).init(key, jnp.ones((2, 4)))["params"]
    tx = optax.adam(1e-2)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    grown_state = surgery.add_branch_like(state, feature_dim=8)
    fresh = tx.init(surgery.add_branch(params, feature_dim=8))
    assert jax.tree.structure(grown_state) == jax.tree.structure(fresh)
    assert jax.tree.map(jnp.shape, grown_state) == jax.tree.map(jnp.shape, fresh)
    assert_trees_equal(
        grown_state[0].mu["backbone"]["branch_0"], state[0].mu["backbone"]["branch_0"]
    )
    np.testing.assert_array_equal(np.asarray(grown_state[0].nu["head"]["kernel"][8:]), 0)


def test_add_branch_rejects_an_unbranched_backbone():
    params = {
        "backbone": {"dense0": {"kernel": jnp.ones((2, 2))}},
        "head": {"kernel": jnp.ones((2, 3))},
    }
    with pytest.raises(ValueError, match="branch_0"):
        surgery.add_branch(params, feature_dim=2)
    with pytest.raises(ValueError, match="no part of the tree"):
        surgery.add_branch_like(params, feature_dim=2)
    gappy = {"backbone": {"branch_0": {"w": jnp.ones(1)}, "branch_2": {"w": jnp.ones(1)}}}
    with pytest.raises(ValueError, match="without gaps"):
        surgery.add_branch({**gappy, "head": {"kernel": jnp.ones((2, 3))}}, feature_dim=2)


def test_count_params_and_summary(key):
    model = build_model("mlp", 3, hidden=(16,))
    params = model.init(key, jnp.ones((1, 8, 8, 1)), train=False)["params"]
    counts = surgery.count_params(params)
    assert (
        counts[""]
        == sum(leaf.size for leaf in jax.tree.leaves(params))
        == 64 * 16 + 16 + 16 * 3 + 3
    )
    assert counts["head"] == 16 * 3 + 3 and counts["head/bias"] == 3
    assert set(surgery.count_params(params, depth=1)) == {"", "backbone", "head"}
    table = surgery.summary(params, [("backbone/.*", True)])
    lines = table.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "params", "frozen"]
    assert any(
        line.split()[:2] == ["head/kernel", "(16,"] and line.endswith("no") for line in lines
    )
    assert lines[-1].split()[1] == f"{counts['']:,}"
    assert f"{counts['backbone']:,} frozen" in lines[-1]

"""The pre-trained-model methods on a tiny ViT over digits, 2 phases: SimpleCIL is the nearest
prototype over a backbone that never moves, RanPAC's head is the joint ridge solution on the
projected features, and L2P trains only its prompts, keys and head, pulls the selected keys to their
queries, and gets its query without a second forward pass in the compiled step."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from capacity_helpers import counting, losses, trace_counts

from configs import digits
from incremental import methods, models, train, workdirs
from incremental import run as run_lib
from incremental.data import device
from incremental.methods import Batch, Outputs, PhaseContext, PhaseInfo
from incremental.methods.analytic import expand
from incremental.methods.dualprompt import DualPromptViT
from incremental.methods.l2p import L2P, match_scores
from incremental.models import build_backbone
from incremental.models.vit import EncoderBlock
from incremental.phase import model as phase_model
from incremental.train.step import make_loss

TINY = {"width": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "patch": 4, "resize": 16}
# Two phases: phase 1 already shows what changes, what stays and what is still unused, and every
# method's run shares its shapes (and so its compiled programs) with the others'.
SIZES = (4, 6)
ARGS = {
    "simplecil": {},
    "ranpac": {"projection_dim": 256},
    "l2p": {"pool_size": 6, "length": 2, "top_n": 2},
    "coda_prompt": {"layers": (0, 1), "pool_size": 6, "num_phases": 3, "length": 4, "ortho": 0.1},
    "dualprompt": {
        "g_layers": (0,),
        "e_layers": (1,),
        "g_length": 2,
        "e_length": 2,
        "pool_size": 4,
    },
}


def config_for(method, **method_args):
    config = digits.get_config(f"method={method},model=vit")
    config.model.kwargs = dict(TINY)
    config.protocol.phase_sizes = ",".join(map(str, SIZES))
    config.train.epochs = config.train_first.epochs = 1
    config.train.milestones = config.train_first.milestones = ()
    config.log.progress = config.log.plot = False
    if method in (
        "l2p",
        "dualprompt",
        "coda_prompt",
    ):  # PILOT's: weight decay would shrink the unused prompts
        config.train.weight_decay = config.train_first.weight_decay = 0.0
    config.method_args.update({**ARGS[method], **method_args})
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-phase run of each method from a random-init ViT, shared below: (results, workdir)."""
    out = {}
    for method in ARGS:
        workdir = str(tmp_path_factory.mktemp(method))
        out[method] = (run_lib.run(config_for(method), workdir), workdir)
    return out


def initial_params(rs):
    """Phase 0's initial params, made as the run makes them (`phase.begin.start_variables`)."""
    info = PhaseInfo(0, 0, SIZES[0])
    model = phase_model.phase_model(rs.config, rs.method, info, num_classes=SIZES[0])
    key = phase_model.named_key(phase_model.phase_key(rs.config, 0), "init")
    return jax.device_get(phase_model.init_variables(model, rs.data.x_train[0], key)["params"])


def restored(workdir, phase):
    rs, saved = workdirs.restore(workdir, phase)
    return rs, jax.device_get(saved.state["params"]), jax.device_get(saved.method_state)


def features(rs, params, x, num_classes):
    model = phase_model.phase_model(
        rs.config, rs.method, PhaseInfo(0, 0, num_classes), num_classes=num_classes
    )
    embed = train.make_apply_batches(model, rs.data.norm, lambda out, _: out.features)
    return np.asarray(train.run_batched(embed, {"params": params, "batch_stats": {}}, {}, x, 256))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def without_prompts(backbone):
    return {k: v for k, v in backbone.items() if k != "prompt"}


def by_phase(correct, labels):
    bounds = np.cumsum((0, *SIZES))
    return [
        correct[(labels >= lo) & (labels < hi)].mean()
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]


def test_simplecil_keeps_the_initial_backbone_bit_for_bit(runs):
    _, workdir = runs["simplecil"]
    rs, _, _ = restored(workdir, 0)
    initial = initial_params(rs)
    for phase in range(len(SIZES)):
        _, params, _ = restored(workdir, phase)
        assert_trees_equal(params["backbone"], initial["backbone"])


def test_simplecil_is_the_nearest_prototype_by_hand(runs):
    results, workdir = runs["simplecil"]
    rs, params, state = restored(workdir, len(SIZES) - 1)
    data = rs.data
    train_feats = features(rs, params, data.x_train, 10).astype(np.float64)
    protos = np.stack([train_feats[data.y_train == c].mean(0) for c in range(10)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    np.testing.assert_allclose(state["class_means"], protos, atol=1e-5)
    test_feats = features(rs, params, data.x_test, 10).astype(np.float64)
    cosine = test_feats / np.linalg.norm(test_feats, axis=1, keepdims=True) @ protos.T
    correct = cosine.argmax(1) == data.y_test
    # The run's float32 scores may order two prototypes within rounding of each other otherwise.
    top2 = np.sort(cosine, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0] < 1e-5).astype(np.float64)
    gap = np.abs(np.asarray(results["accuracy_matrix"][-1]) - by_phase(correct, data.y_test))
    assert np.all(gap <= np.asarray(by_phase(near_tie, data.y_test)) + 1e-12), gap
    assert results["last_accuracy"] > 1.5 / 10  # a random backbone's prototypes beat chance


def test_simplecil_folds_later_examples_of_known_classes_into_their_means():
    """A phase that brings examples of known classes too (`incremental learn`) moves their
    prototypes to the mean over all their examples so far, from the kept sums and counts."""
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.arange(60) % 3, np.arange(50) % 5]).astype(np.int32)
    feats = rng.normal(size=(110, 6)).astype(np.float32) + labels[:, None]
    arrival = (np.arange(110) >= 60).astype(np.int32)
    method, state = methods.build("simplecil"), {}
    head = {"params": {"head": {"kernel": np.zeros((6, 5), np.float32)}}}
    for phase, info in enumerate((PhaseInfo(0, 0, 3), PhaseInfo(1, 3, 2))):
        ctx = PhaseContext(info, labels, feats, lambda variables, x: x, arrival=arrival)
        state = method.end_phase(ctx, head, state)
        seen = arrival <= phase
        want = np.stack([feats[seen & (labels == c)].astype(np.float64).mean(0) for c in range(5)
                         if (seen & (labels == c)).any()])  # fmt: skip
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(state["class_means"][: len(want)], want, atol=1e-6)
    assert method.learn_problem(0, True) is None


def test_ranpac_head_is_the_joint_ridge_solution_on_the_projected_features(runs):
    results, workdir = runs["ranpac"]
    _, first, _ = restored(workdir, 0)
    rs, params, state = restored(workdir, len(SIZES) - 1)
    assert_trees_equal(params["backbone"], first["backbone"])  # frozen after phase 0
    feats = features(rs, params, rs.data.x_train, 10)
    h = np.asarray(expand(jnp.asarray(feats), state), np.float64)
    ridge = float(state["ridge"])
    onehot = np.eye(10)[rs.data.y_train]
    # The ridge as least squares on [H; √λ I] (SVD): well posed where G + λI is not.
    stacked = np.concatenate([h, np.sqrt(ridge) * np.eye(h.shape[1])])
    targets = np.concatenate([onehot, np.zeros((h.shape[1], 10))])
    want = np.linalg.lstsq(stacked, targets, rcond=None)[0]
    assert state["weight"].shape == (256, 10) and 1e-8 <= ridge <= 1e8
    error = np.linalg.norm(state["weight"] - want) / np.linalg.norm(want)
    assert error < 1e-4, (error, ridge)
    assert results["last_accuracy"] > 0.5


def test_l2p_trains_only_prompts_keys_and_new_head_columns(runs):
    _, workdir = runs["l2p"]
    rs, _, _ = restored(workdir, 0)
    before = initial_params(rs)
    for phase in range(len(SIZES)):
        _, params, _ = restored(workdir, phase)
        backbone = params["backbone"]
        assert_trees_equal(without_prompts(backbone), without_prompts(before["backbone"]))
        for name in ("keys", "prompts"):
            assert not np.array_equal(backbone["prompt"][name], before["backbone"]["prompt"][name])
        old = sum(SIZES[:phase])
        np.testing.assert_array_equal(
            params["head"]["kernel"][:, :old], before["head"]["kernel"][:, :old]
        )
        before = params


def test_l2p_pulls_the_selected_keys_to_their_queries(runs):
    """On each later phase's training data, the selected keys' mean cosine to the queries is higher
    after the phase's training than before it."""
    _, workdir = runs["l2p"]
    rs, _, _ = restored(workdir, 0)
    method = rs.method
    model = phase_model.phase_model(rs.config, method, PhaseInfo(0, 0, 10), num_classes=10)

    @jax.jit
    def selected(backbone, x):
        params = {
            "backbone": backbone,
            "head": {"kernel": jnp.zeros((32, 10)), "bias": jnp.zeros(10)},
        }
        cosine = model.apply({"params": params}, x, train=False, method=match_scores)
        return jax.lax.top_k(cosine, method.top_n)[0].mean()

    for phase in range(1, len(SIZES)):
        _, before, _ = restored(workdir, phase - 1)
        _, after, _ = restored(workdir, phase)
        lo, hi = sum(SIZES[:phase]), sum(SIZES[: phase + 1])
        x = rs.data.x_train[(rs.data.y_train >= lo) & (rs.data.y_train < hi)]
        x = device.normalize(jnp.asarray(x), rs.data.norm, jnp.float32)
        gain = selected(after["backbone"], x) - selected(before["backbone"], x)
        assert gain > 1e-3, (phase, gain)


def test_l2p_query_costs_no_second_forward_pass():
    """The loss's key-query cosines repeat the backbone's frozen [CLS] pass; in the compiled step
    XLA merges the two, so the surrogate term costs far less than one forward pass."""

    class NoPull(L2P):
        def loss(self, out, batch, *, params, method_state, info, apply_fn):
            ce = models.cross_entropy(models.mask_old(out.logits, info.num_old), batch.y)
            return ce, {"ce": ce}

    config = config_for("l2p")
    info = PhaseInfo(1, 4, 3)
    batch = Batch(jnp.zeros((16, 8, 8, 1)), jnp.full((16,), 5), jnp.ones((16,)))

    def flops(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    def step_flops(method):
        model = phase_model.phase_model(config, method, info)
        init = lambda: model.init(jax.random.PRNGKey(0), batch.x, train=False)  # noqa: E731
        params = jax.eval_shape(init)["params"]  # shapes suffice: nothing runs
        loss_fn = make_loss(model, method, info, method.setup(info))
        return flops(jax.value_and_grad(loss_fn, has_aux=True), params, {}, {}, batch, None)

    vit = build_backbone("vit", **TINY)
    vit_params = jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), batch.x))
    forward = flops(vit.apply, vit_params, batch.x)
    extra = step_flops(L2P(**ARGS["l2p"])) - step_flops(NoPull(**ARGS["l2p"]))
    assert 0 < extra < 0.1 * forward, (extra, forward)


def test_l2p_loss_sees_only_the_phases_classes():
    method = L2P(**ARGS["l2p"])
    info = PhaseInfo(1, 4, 3)
    logits = jax.random.normal(jax.random.PRNGKey(0), (8, 7))
    batch = Batch(jnp.zeros((8, 8, 8, 1)), jnp.arange(8) % 3 + 4, jnp.ones((8,)))
    cosines = lambda *args, **kwargs: jnp.zeros((8, 6))  # noqa: E731
    loss = lambda z: method.loss(  # noqa: E731
        Outputs(jnp.zeros((8, 32)), z), batch, params={}, method_state={}, info=info,
        apply_fn=cosines,
    )[0]  # fmt: skip
    changed = logits.at[:, :4].add(100.0)
    np.testing.assert_array_equal(loss(logits), loss(changed))
    assert not np.array_equal(loss(logits), loss(logits.at[:, 4].add(1.0)))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="top_n"):
        methods.build("l2p", {"top_n": 11})
    with pytest.raises(ValueError, match="model.name must be 'vit'"):
        L2P().backbone(lambda: build_backbone("mlp"), PhaseInfo(0, 0, 2))
    with pytest.raises(ValueError, match="projection_dim"):
        methods.build("ranpac", {"projection_dim": 0})


def block_outputs(model, params, x, phase=1):
    """Each block's output, in order, from one training-mode forward pass (one ViT call) of
    `phase`."""
    return _block_outputs(model, params, x, phase)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _block_outputs(model, params, x, phase):
    capture = lambda module, _: isinstance(module, EncoderBlock)  # noqa: E731
    _, state = model.apply(
        {"params": params}, x, train=True, phase=phase, capture_intermediates=capture,
        mutable=["intermediates"],
    )  # fmt: skip
    blocks = state["intermediates"]["Transformer"]
    return [blocks[f"encoderblock_{i}"]["__call__"][0] for i in range(len(blocks))]


def first_changed(model, params, changed, x):
    pairs = zip(block_outputs(model, params, x), block_outputs(model, changed, x), strict=True)
    return next((i for i, (a, b) in enumerate(pairs) if not np.array_equal(a, b)), None)


def test_dualprompt_prefixes_enter_exactly_their_layers():
    """With PILOT's layers (G: 0-1, E: 2-4) in a 6-block ViT, a change to one layer's prompt first
    changes that layer's output; the other E-prompts of the pool change nothing in training."""
    vit = build_backbone("vit", **{**TINY, "depth": 6})
    model = DualPromptViT(vit, (0, 1), (2, 3, 4), 2, 2, pool_size=4)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)
    params = phase_model.init_variables(model, x[0], jax.random.key(0))["params"]  # a run's init
    prompt = params["prompt"]

    def with_prompt(name, index):
        return {**params, "prompt": {**prompt, name: prompt[name].at[index].add(0.5)}}

    for i, layer in enumerate((0, 1)):
        assert first_changed(model, params, with_prompt("g", i), x) == layer
    for i, layer in enumerate((2, 3, 4)):
        assert first_changed(model, params, with_prompt("e", (1, i)), x) == layer
    assert first_changed(model, params, with_prompt("e", 0), x) is None  # phase 1 uses E-prompt 1
    assert first_changed(model, params, with_prompt("e", (1, 2)), x) == 4  # and block 5 after it
    outputs = block_outputs(model, with_prompt("e", (1, 2)), x)
    assert not np.array_equal(outputs[5], block_outputs(model, params, x)[5])


def test_dualprompt_traced_phase_picks_the_e_prompt_a_python_phase_picks():
    """In training the phase's E-prompt, past the pool the closest one (as at test time), alike for
    a phase given as a Python int (widening) and traced (`head.capacity`: `nn.cond`)."""
    vit = build_backbone("vit", **TINY)
    model = DualPromptViT(vit, (0,), (1,), 2, 2, pool_size=2)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 8, 8, 1)), jnp.float32)
    variables = phase_model.init_variables(model, x[0], jax.random.key(0))
    query = lambda module, x: module.vit(x) if module.prompt else None  # noqa: E731  (after setup)
    queries = jax.jit(functools.partial(model.apply, method=query))(variables, x[:2])
    prompt = {**variables["params"]["prompt"], "keys": queries}  # images 0 and 1 pick keys 0 and 1
    variables = {"params": {**variables["params"], "prompt": prompt}}
    chosen = lambda module, x, phase: module.chosen(x, phase)  # noqa: E731
    pick = lambda phase: model.apply(variables, x, phase, method=chosen)  # noqa: E731
    given = jax.jit(pick, static_argnums=0)  # None or a Python int
    closest = np.asarray(given(None))
    assert closest[:2].tolist() == [0, 1]
    for phase in (0, 1, 2, 3):
        expected = [phase] * 16 if phase < 2 else closest
        np.testing.assert_array_equal(jax.jit(pick)(jnp.asarray(phase)), expected)  # traced
        np.testing.assert_array_equal(given(phase), expected)


def test_dualprompt_trains_the_phases_e_prompt_its_key_and_the_g_prompt(runs):
    _, workdir = runs["dualprompt"]
    rs, _, _ = restored(workdir, 0)
    before = initial_params(rs)
    for phase in range(len(SIZES)):
        _, params, _ = restored(workdir, phase)
        backbone, old = params["backbone"], before["backbone"]
        assert_trees_equal(without_prompts(backbone), without_prompts(old))
        new, was = backbone["prompt"], old["prompt"]
        assert not np.array_equal(new["g"], was["g"])
        assert not np.array_equal(new["keys"][phase], was["keys"][phase])
        others = np.arange(4) != phase
        np.testing.assert_array_equal(new["keys"][others], was["keys"][others])
        np.testing.assert_array_equal(new["e"][phase + 1 :], was["e"][phase + 1 :])
        np.testing.assert_array_equal(new["e"][:phase], was["e"][:phase])
        assert not np.array_equal(new["e"][phase], was["e"][phase])
        before = params


def test_dualprompt_phase_t_starts_from_e_prompt_t_minus_1():
    e = jnp.arange(4 * 3.0).reshape(4, 3)
    variables = {"params": {"backbone": {"prompt": {"e": e, "g": 1.0}, "cls": 2.0}, "head": 3.0}}
    method = methods.build("dualprompt", ARGS["dualprompt"])
    ctx = PhaseContext(PhaseInfo(2, 7, 3), None, None, None)
    grown = method.grow(ctx, variables, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(grown["params"]["backbone"]["prompt"]["e"], e.at[2].set(e[1]))
    assert grown["params"]["backbone"]["cls"] == 2.0 and grown["params"]["head"] == 3.0


def test_coda_prompt_trains_only_its_phases_slice_of_components(runs):
    """Phase t changes slice t of keys, attention vectors and components; the older slices stay as
    they were (behind a stop-gradient), the later ones zero; the ViT does not move."""
    _, workdir = runs["coda_prompt"]
    rs, _, _ = restored(workdir, 0)
    before = initial_params(rs)
    for phase in range(len(SIZES)):
        _, params, _ = restored(workdir, phase)
        backbone, old = params["backbone"], before["backbone"]
        assert_trees_equal(without_prompts(backbone), without_prompts(old))
        start, stop = 2 * phase, 2 * phase + 2
        for name, table in backbone["prompt"].items():
            np.testing.assert_array_equal(table[:, :start], old["prompt"][name][:, :start])
            assert not np.any(table[:, stop:]), name
            assert np.all(np.abs(table[:, start:stop]).sum(axis=-1) > 0), name
        before = params


@pytest.mark.parametrize(
    "method", ["coda_prompt", pytest.param("dualprompt", marks=pytest.mark.slow)]
)
def test_prompt_methods_compile_once_with_the_widening_numbers(method, tmp_path, monkeypatch):
    """The phase reaches the prompted ViT as an input of its call (`Method.phase_input`), so under
    `head.capacity` one training program serves every phase, with the accuracies and losses of the
    run that widens its head and traces its loss again in every phase."""
    cls = counting(methods.METHODS[method])
    monkeypatch.setitem(methods.METHODS, cls.name, cls)
    results, counts = {}, {}
    for capacity in (0, sum(SIZES)):
        trace_counts.clear()
        config = config_for(method)
        config.method, config.head.capacity = cls.name, capacity
        results[capacity] = run_lib.run(config, str(tmp_path / str(capacity)))
        counts[capacity] = dict(trace_counts)
    widened, wide = results[0], results[sum(SIZES)]
    assert wide["accuracy_matrix"] == widened["accuracy_matrix"]
    np.testing.assert_allclose(losses(wide), losses(widened), rtol=1e-6)
    assert counts[0]["loss"] == len(SIZES) and counts[sum(SIZES)]["loss"] == 1


@pytest.mark.slow
def test_dualprompt_seeds_in_one_program_have_their_own_runs_numbers(runs, tmp_path):
    """Under `config.seeds` the traced phase picks the E-prompt inside a vmapped step (`nn.cond`
    becomes a select there): each seed's accuracies are those of its own run."""
    config = config_for("dualprompt")
    config.seeds = (0, 1)
    run_lib.run(config, str(tmp_path / "seeds"))
    single = config_for("dualprompt")
    single.seed = 1
    alone = {0: runs["dualprompt"][0], 1: run_lib.run(single, str(tmp_path / "alone"))}
    for seed in (0, 1):
        doc = json.loads((tmp_path / "seeds" / f"seed_{seed}" / "results.json").read_text())
        assert doc["accuracy_matrix"] == alone[seed]["accuracy_matrix"], seed
        np.testing.assert_allclose(losses(doc), losses(alone[seed]), rtol=1e-6)


def test_coda_prompt_new_slice_is_orthonormal_to_the_old_ones():
    method = methods.build("coda_prompt", ARGS["coda_prompt"])
    rng = np.random.default_rng(0)
    tables = {
        "keys": rng.normal(size=(2, 6, 32)),
        "attention": rng.normal(size=(2, 6, 32)),
        "components": rng.normal(size=(2, 6, 4, 32)),
    }
    tables = {k: jnp.asarray(v, jnp.float32).at[:, 4:].set(0.0) for k, v in tables.items()}
    variables = {"params": {"backbone": {"prompt": tables}, "head": {}}}
    ctx = PhaseContext(PhaseInfo(2, 7, 3), None, None, None)
    grown = method.grow(ctx, variables, jax.random.PRNGKey(0))["params"]["backbone"]["prompt"]
    for name, table in grown.items():
        flat = np.asarray(table, np.float64).reshape(2, 6, -1)
        np.testing.assert_array_equal(
            flat[:, :4], np.asarray(tables[name]).reshape(2, 4 + 2, -1)[:, :4]
        )
        for layer in flat:
            new, old = layer[4:], layer[:4]
            np.testing.assert_allclose(new @ new.T, np.eye(2), atol=1e-5)
            np.testing.assert_allclose(new @ old.T, 0.0, atol=1e-4)


def test_a_prompt_method_starts_from_a_pretrained_vit_and_keeps_its_prompts(runs, tmp_path):
    """`model.pretrained` fills the ViT's part of `params/backbone`; L2P's prompt pool beside it is
    no part of the checkpoint and starts as initialised, and the loaded ViT stays frozen."""
    from incremental.models import vit_weights

    config = config_for("l2p")
    # Weights unlike the run's own initial ones: SimpleCIL's initial ViT, every number moved.
    _, initial, _ = restored(runs["simplecil"][1], 0)
    given = jax.tree.map(lambda w: np.asarray(w) + np.float32(0.25), initial["backbone"])
    config.model.pretrained = str(tmp_path / "given.npz")
    vit_weights.save_npz(config.model.pretrained, given)
    run_lib.run(config, str(tmp_path / "run"))
    for phase in (0, 1):
        backbone = restored(str(tmp_path / "run"), phase)[1]["backbone"]
        assert set(backbone) == {*given, "prompt"}
        jax.tree.map(
            np.testing.assert_array_equal,
            jax.device_get({k: backbone[k] for k in given}),
            jax.device_get(given),
        )

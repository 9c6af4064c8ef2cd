import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import digits
from incremental import report, surgery, train
from incremental import run as run_lib
from incremental.data import device
from incremental.methods import METHODS
from incremental.phase import load
from incremental.phase import model as phase_model
from incremental.train.optim import NEVER


def tiny_config(method="finetune", epochs=3):
    config = digits.get_config(f"method={method}")
    config.log.progress = False
    config.log.plot = False
    config.train.epochs = config.train_first.epochs = epochs
    return config


# How often the train step and prediction are traced per phase (and per run with head.capacity)
# is checked in tests/test_capacity.py.


def test_batch_indices_cover_every_example_once_with_fixed_shapes(key):
    idx, weight = device.batch_indices(key, 10, 4)
    assert idx.shape == weight.shape == (3, 4)
    real = np.asarray(idx)[np.asarray(weight) == 1]
    assert sorted(real.tolist()) == list(range(10))
    assert float(weight.sum()) == 10
    idx, weight = device.batch_indices(key, 3, 8)  # fewer examples than a batch
    assert sorted(np.asarray(idx)[np.asarray(weight) == 1].tolist()) == [0, 1, 2]


def test_augmentation_crops_and_flips_images(key):
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.uint8).reshape(2, 4, 4, 1)
    flipped = device.random_flip(key, jnp.repeat(x[:1], 64, axis=0))
    unique = {np.asarray(f).tobytes() for f in flipped}
    assert unique == {np.asarray(x[0]).tobytes(), np.asarray(x[0, :, ::-1]).tobytes()}
    cropped = device.random_crop(key, jnp.repeat(x[:1], 64, axis=0), 1)
    assert cropped.shape == (64, 4, 4, 1) and cropped.dtype == jnp.uint8
    assert len({np.asarray(c).tobytes() for c in cropped}) > 3  # several different crops


def test_brightness_scales_each_image_by_one_factor_as_colorjitter(key):
    """torchvision's ColorJitter(brightness=b): img * U[1 - b, 1 + b], clipped to the image range."""
    b = 63 / 255
    x = jnp.tile(jnp.array([10, 100, 200, 250], jnp.uint8).reshape(1, 2, 2, 1), (256, 1, 1, 1))
    out = np.asarray(device.random_brightness(key, x, b))
    factors = out[:, 0, 0, 0] / 10.0  # from the darkest pixel, never clipped
    assert factors.min() >= 1 - b - 1e-6 and factors.max() <= 1 + b + 1e-6
    assert factors.min() < 1 - 0.8 * b and factors.max() > 1 + 0.8 * b  # spans the range
    expected = np.minimum(np.asarray(x, np.float32) * factors[:, None, None, None], 255)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert out.max() == 255.0  # 250 * factor > 255 is clipped
    floats = np.asarray(device.random_brightness(key, x.astype(jnp.float32) / 255, b))
    assert floats.max() == 1.0  # float images are clipped at 1


def cutout_by_loops(image, y, x, length):
    """The official FOSTER code's Cutout for one image and centre, as its loop writes it."""
    h, w = image.shape[:2]
    y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
    x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
    out = image.copy()
    out[y1:y2, x1:x2] = 0
    return out


@pytest.mark.parametrize("length", [16, 5])
def test_cutout_zeroes_one_clipped_square_per_image(key, length):
    x = jnp.full((512, 32, 32, 3), 7, jnp.uint8)
    out = np.asarray(device.random_cutout(key, x, length))
    assert out.dtype == np.uint8
    for image in out:
        rows, cols = np.nonzero(image[..., 0] == 0)
        # The zeroed pixels are one square clipped at the borders, the same on every channel...
        y = rows.min() + length // 2 if rows.min() > 0 else rows.max() + 1 - length // 2
        x_ = cols.min() + length // 2 if cols.min() > 0 else cols.max() + 1 - length // 2
        np.testing.assert_array_equal(image, cutout_by_loops(np.full_like(image, 7), y, x_, length))
    # ...centred anywhere on the image, so that it is clipped at each border sometimes.
    side = 2 * (length // 2)  # the official loop's square: an odd length loses a row and a column
    zeroed = (out[..., 0] == 0).sum((1, 2))
    assert zeroed.max() == side * side and zeroed.min() < side * side // 2
    assert (out[:, 0] == 0).any() and (out[:, -1] == 0).any() and (out[:, :, 0] == 0).any()


def test_augment_without_brightness_keeps_its_crops_and_flips(key):
    """Adding brightness draws from its own key: crops and flips stay those of the same step."""
    x = jnp.arange(8 * 4 * 4 * 1, dtype=jnp.uint8).reshape(8, 4, 4, 1)
    plain = device.augment(key, x, device.Augment(1, True))
    bright = device.augment(key, x, device.Augment(1, True, 0.5))
    ratio = np.asarray(bright) / np.maximum(np.asarray(plain, np.float32), 1)
    nonzero = np.asarray(plain) > 0
    for r, m in zip(ratio, nonzero, strict=True):  # one factor per image where nothing clips
        np.testing.assert_allclose(r[m], r[m][0], rtol=1e-5)


@pytest.mark.parametrize("kind", ["multistep", "cosine", "constant"])
def test_schedules_follow_epoch_milestones(kind):
    hp = train.PhaseHparams(epochs=10, lr=0.1, milestones=(4, 8), weight_decay=0.0)
    schedule = train.make_schedule(kind, hp, steps_per_epoch=5, lr_decay=0.1)
    if kind == "multistep":
        assert float(schedule(19)) == pytest.approx(0.1)
        assert float(schedule(20)) == pytest.approx(0.01)
        assert float(schedule(40)) == pytest.approx(0.001)
    elif kind == "cosine":
        assert float(schedule(0)) == pytest.approx(0.1)
        assert float(schedule(50)) == pytest.approx(0.0, abs=1e-7)
    else:
        assert float(schedule(49)) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["multistep", "cosine", "constant"])
def test_schedules_give_the_same_rates_for_a_traced_epoch_length(kind):
    """A program compiled once for phases of any length (head.capacity), whose learning rate and
    milestones are inputs too (padded with milestones no epoch reaches), gets each phase's rates."""
    hp = train.PhaseHparams(epochs=7, lr=0.1, milestones=(5, 3), weight_decay=0.0)
    padded = jnp.asarray([3, 5, NEVER, NEVER], jnp.int32)
    steps = jnp.arange(7 * 13 + 4, dtype=jnp.int32)
    for per_epoch in (1, 5, 13):
        static = jax.jit(jax.vmap(train.make_schedule(kind, hp, per_epoch, 0.1)))(steps)
        traced = jax.jit(
            lambda s, n, lr, bounds: jax.vmap(
                train.make_schedule(kind, hp._replace(lr=lr, milestones=bounds), n, 0.1)
            )(s)
        )(steps, jnp.int32(per_epoch), jnp.float32(hp.lr), padded)
        np.testing.assert_array_equal(np.asarray(traced), np.asarray(static))
        if kind == "multistep":  # bit for bit optax's schedule of both milestones at once
            whole = optax.piecewise_constant_schedule(0.1, {3: 0.1, 5: 0.1})
            reference = jax.jit(lambda s: whole(s // per_epoch))(steps)  # noqa: B023
            np.testing.assert_array_equal(np.asarray(static), np.asarray(reference))
    if kind == "multistep":  # the milestones act: 0.1 before epoch 3, 0.01 to 5, 0.001 after
        rates = np.asarray(static)[[0, 3 * 13, 5 * 13]]
        np.testing.assert_allclose(rates, [0.1, 0.01, 0.001], rtol=1e-6)


def test_phase_hyperparams_take_phase_0s_settings_then_the_later_ones():
    config = tiny_config()
    config.train_first.lr, config.train.lr = 0.5, 0.05
    config.train_first.weight_decay, config.train.weight_decay = 1e-3, 5e-4
    hyperparams = jax.jit(train.phase_hyperparams(config))
    values = lambda phase, step, per_epoch: hyperparams(  # noqa: E731
        phase, train.phase_arrays(config, phase), step, per_epoch
    )
    first, later = values(0, 0, 4), values(2, 0, 4)
    assert float(first["learning_rate"]) == np.float32(0.5)
    assert float(later["learning_rate"]) == np.float32(0.05)
    assert float(first["weight_decay"]) == np.float32(1e-3)
    assert float(later["weight_decay"]) == np.float32(5e-4)
    decayed = values(1, 4 * 20, 4)  # epoch 20, the milestone
    assert float(decayed["learning_rate"]) == pytest.approx(0.005)


def test_runs_that_differ_only_in_lr_weight_decay_and_milestones_share_the_program():
    """The phase's settings are inputs of the compile-once step (`train.phase_arrays`): an lr sweep
    lowers one program; `lr_decay` is still a constant of it."""

    def lowered(**settings):
        config = tiny_config()
        for name, value in settings.items():
            setattr(config.train, name, value)
        hyperparams = jax.jit(train.phase_hyperparams(config))
        return hyperparams.lower(1, train.phase_arrays(config, 1), 0, 4).as_text()

    base = lowered()
    assert lowered(lr=0.3, weight_decay=0.0, milestones=(2, 5, 7), epochs=9) == base
    assert lowered(lr_decay=0.5) != base


def test_batch_indices_for_a_traced_count_are_the_epochs_batches(key):
    for num, slots, batch in [(10, 10, 4), (10, 37, 4), (3, 50, 8), (300, 1437, 64)]:
        idx, weight = device.batch_indices(key, num, batch)
        wide_idx, wide_weight = jax.jit(
            lambda n: device.batch_indices(key, n, batch, slots)  # noqa: B023
        )(jnp.int32(num))
        count = idx.shape[0]
        assert wide_idx.shape == (-(-slots // batch), batch)
        np.testing.assert_array_equal(np.asarray(wide_idx[:count]), np.asarray(idx))
        np.testing.assert_array_equal(np.asarray(wide_weight[:count]), np.asarray(weight))
        assert float(wide_weight[count:].sum()) == 0


def test_unknown_optimizer_and_schedule_are_named():
    config = tiny_config()
    hp = train.phase_hparams(config, 0)
    with pytest.raises(ValueError, match="Unknown schedule 'steps'"):
        train.make_schedule("steps", hp, 1, 0.1)
    config.train.optimizer = "lion"
    with pytest.raises(ValueError, match="Unknown optimizer 'lion'.*sgd"):
        train.make_optimizer(config.train, hp, 1, {}, METHODS["finetune"]().setup(None), 0)


def test_carried_adam_state_has_zero_moments_for_new_columns(tmp_path):
    config = tiny_config(epochs=2)
    config.train.optimizer = "adam"
    config.train.carry_opt_state = True
    config.head.capacity = 0  # the head widens: what the new columns' moments start from
    data, protocol, _ = load.load_data(config)
    method = METHODS["finetune"]()
    progress = report.Progress(protocol, enabled=False)
    with progress:
        first = run_lib.train_phase(config, method, data, protocol, 0, None, {}, progress)
    params = first.variables["params"]
    hp = train.phase_hparams(config, 1)
    setup = method.setup(None)
    wide = surgery.widen_head(params, 2, jax.random.PRNGKey(1))
    tx = train.make_optimizer(config.train, hp, 1, wide, setup, 2)
    carried = train.carry_opt_state(first.opt_state, tx.init(wide), 2)
    assert carried is not None
    assert int(carried.count) == 0  # the schedule restarts with the phase
    assert int(carried.hyperparams_states["learning_rate"].count) == 0
    mu = carried.inner_state[1][0].mu  # chain(add_decayed_weights, adam) -> adam's state
    assert mu["head"]["kernel"].shape == wide["head"]["kernel"].shape
    np.testing.assert_array_equal(np.asarray(mu["head"]["kernel"][:, 2:]), 0)
    assert np.any(np.asarray(mu["head"]["kernel"][:, :2]) != 0)
    assert np.any(np.asarray(mu["backbone"]["dense0"]["kernel"]) != 0)


def test_python_loop_of_steps_gives_the_scans_numbers(tmp_path):
    """`train.loop=steps` (the CPU default for conv models) runs the same steps as the scan."""
    config = tiny_config("replay", epochs=2)
    config.protocol.phase_sizes = "4,6"  # phase 1 trains on new data and the memory
    config.checkpoint.every_steps = 3
    results = {}
    for loop in ("scan", "steps"):
        config.train.loop = loop
        results[loop] = run_lib.run(config, str(tmp_path / loop))
    losses = {k: [p["final_loss"] for p in r["phases"]] for k, r in results.items()}
    np.testing.assert_allclose(losses["steps"], losses["scan"], rtol=1e-4)
    flat = {k: np.concatenate(r["accuracy_matrix"]) for k, r in results.items()}
    np.testing.assert_allclose(flat["steps"], flat["scan"], atol=0.02)


def test_applying_in_chunks_gives_every_examples_scores_from_a_few_programs(key):
    """Data of any size runs in calls of `CHUNK` batches, the last padded to a power of two: each
    example's scores are those of one call over all its batches, and 8 sizes run 4 programs."""
    model = phase_model.make_model(tiny_config(), 5)
    x = np.asarray(jax.random.normal(key, (88 * 8, 64)), np.float32)
    variables = model.init(key, x[:1], train=False)
    norm = device.Normalizer(np.zeros((1, 64), np.float32), np.ones((1, 64), np.float32))
    apply = train.make_apply_batches(model, norm, lambda out, _: out.logits)
    whole = np.asarray(apply(variables, {}, device.padded_batches(x, 8)[0])).reshape(-1, 5)
    for batches in (1, 3, 4, 5, 7, 17, 33, 88):  # calls of 1; 4; 4; 8; 8; 16+1; 16+16+1; 16*5+8
        n = 8 * batches - 3
        scores = train.run_batched(apply, variables, {}, x[:n], 8)
        np.testing.assert_array_equal(scores, whole[:n])
    assert train.apply.chunk_sizes(88) == [16] * 5 + [8]
    assert apply._cache_size() == 1 + 4  # the call over all 88 batches, then 1, 4, 8 and 16

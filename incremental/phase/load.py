"""The load stage: the config checked, the data loaded, the protocol built and the labels remapped."""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from incremental import capacity, methods, online, parallel, schema
from incremental.data import device, domains, sources
from incremental.methods import Method, PhaseInfo
from incremental.models import MODELS
from incremental.phase import pretrained
from incremental.phase.model import init_variables, phase_model
from incremental.protocol import Protocol, make_class_order, make_protocol, scenario_of


class RunData(NamedTuple):
    """The dataset after the protocol: labels remapped to positions in the class order."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    norm: device.Normalizer
    is_image: bool
    fingerprint: str = ""  # `fingerprint` of the four arrays, kept with every checkpoint
    # The phase in which each training example arrives: its class's phase, or for the examples of
    # a learned source (`dataset.learned`, `incremental learn`) the phase that brought them.
    arrival: np.ndarray | None = None
    # The phase of each test example where it is not its class's: its domain (`scenario='domain'`).
    test_arrival: np.ndarray | None = None


FULL_HASH_BYTES = 1 << 30  # larger arrays are hashed on a sample of rows


def fingerprint(*arrays: np.ndarray, names: tuple[str, ...] | None = None) -> str:
    """A hash of the arrays' dtypes, shapes and contents: other data, another fingerprint.

    Arrays up to 1 GiB are hashed whole; of a larger one (an ImageNet training set), every k-th row
    with k = ceil(nbytes / 1 GiB), so a change confined to rows it skips goes unseen.
    """
    digest = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.asarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        step = max(1, -(-a.nbytes // FULL_HASH_BYTES))
        digest.update(np.ascontiguousarray(a[::step]).tobytes())
    if names is not None:  # a class renamed is other data too
        digest.update(repr(tuple(names)).encode())
    return digest.hexdigest()


def source_options(config) -> dict:
    """The keyword arguments of `sources.load_source` from `config`.

    A config saved before the image-folder keys existed (an older run's checkpoints) lacks them;
    they take their defaults, which are what such a run loaded.
    """
    dataset = config.dataset
    return {
        "data_dir": dataset.data_dir or None,
        "download": dataset.download,
        "seed": config.seed,
        "remap_labels": dataset.remap_labels,
        "image_size": dataset.get("image_size", 0),
        "holdout": dataset.get("holdout", 0.2),
        "skip_bad": dataset.get("skip_bad_files", False),
    }


def load_data(config) -> tuple[RunData, Protocol, sources.Source]:
    """Loads the source, builds the protocol and remaps the labels.

    Each source of `dataset.learned` (brought by `incremental learn`, in order) is merged into the
    data (`sources.merge`: classes matched by name, new ones appended) as one more phase, which
    introduces its new classes and trains on all of its examples. The inputs are normalised with
    the statistics of the first source's training set, those the earlier phases trained with.
    With `dataset.validation`, every source's test split is replaced by a validation split of its
    training data (`sources.validation_split`).
    """
    options = source_options(config)
    validation = config.dataset.get("validation", 0.0)

    def load(name: str) -> sources.Source:
        source = sources.load_source(name, **options)
        return sources.validation_split(source, validation) if validation else source

    source = sources.subset_classes(load(config.dataset.name), config.dataset.classes)
    domain = domain_data(config, source) if scenario_of(config) == "domain" else None
    source = source if domain is None else domain.source  # every phase's domain, in turn
    protocol = make_protocol(source.num_classes, config.protocol)
    # The data's statistics, or the constants a pre-trained backbone was trained with.
    norm = pretrained.normalizer(config, source.x_train, source.is_image, source.max_value)
    arrival = protocol.phase_of(protocol.remap(source.y_train))
    if config.protocol.get("blurry", 0.0):  # earlier phases' classes in later phases' streams
        arrival = online.blurry_arrival(arrival, config.protocol.blurry, config.seed)
    if domain is not None:  # a phase brings its domain: the same classes, other inputs
        arrival = domain.train_domain
    for name in config.dataset.get("learned", ()):
        source, new_ids = sources.merge(source, load(name))
        protocol = Protocol(protocol.class_order + new_ids, (*protocol.phase_sizes, len(new_ids)))
        brought = len(source.y_train) - len(arrival)
        arrival = np.concatenate([arrival, np.full(brought, protocol.num_phases - 1)])
    protocol = protocol._replace(class_names=source.class_names)
    y_train, y_test = protocol.remap(source.y_train), protocol.remap(source.y_test)
    arrays = (source.x_train, y_train, source.x_test, y_test)
    names = source.class_names
    test_arrival = None if domain is None else domain.test_domain
    data = RunData(
        *arrays, norm, source.is_image, fingerprint(*arrays, names=names), arrival, test_arrival
    )
    return data, protocol, source


def domain_data(config, source: sources.Source) -> domains.DomainData:
    """The domain scenario's data (`data.domains.make_domains`): the source of every phase's
    domain, and the domain of each training and each test example."""
    if config.dataset.get("learned", ()):
        raise ValueError(
            "dataset.learned brings new phases of a class-incremental run; the domain scenario "
            "makes its phases from protocol.domains. Use one or the other."
        )
    p = config.protocol
    order = make_class_order(source.num_classes, p.class_order, p.class_order_seed)
    return domains.make_domains(source, p.domains, p.num_domains, p.domain_seed, order)


def check_learned_phases(method: Method, data: RunData, protocol: Protocol) -> None:
    """Refuses a phase that the method cannot train: one that brings no new classes, or examples of
    classes learned before (`dataset.learned`), where the method's maths needs otherwise."""
    later = data.arrival != protocol.phase_of(data.y_train)  # arrived after its class's phase
    with_known = set(np.unique(data.arrival[later]).tolist())
    for phase in range(protocol.num_phases):
        num_new, known = protocol.phase_sizes[phase], phase in with_known
        if num_new and not known:
            continue
        problem = method.learn_problem(num_new, known)
        if problem:
            brings = f"{num_new} new classes" + (" and examples of known ones" if known else "")
            raise ValueError(
                f"Method {method.name!r} cannot train phase {phase}, which brings {brings}: "
                f"{problem}"
            )


def validate(config, workdir: str) -> tuple[RunData, Protocol, Method]:
    """Checks every input that can be checked before anything is written or trained; loads."""
    schema.check(config)  # types, ranges and choices of every key
    method = methods.build(config.method, config.method_args, config.memory)
    online.check(config, method)
    check_scenario(config, method)
    if config.model.name not in MODELS:
        raise ValueError(
            f"Unknown model.name {config.model.name!r}; valid values: {', '.join(MODELS)}."
        )
    parallel.check_batch(parallel.make_mesh(config.parallel.devices), config.train.batch_size)
    data, protocol, _ = load_data(config)
    if hasattr(method, "memory"):
        method.memory.per_class_count(protocol.num_classes)
    capacity.check(config, method, protocol.num_classes)
    check_learned_phases(method, data, protocol)
    check_model_fits(config, method, data)
    check_resized_crop(config, data)
    if config.model.init_from:
        check_given_model(config, method, data, protocol)
    if config.model.get("pretrained"):
        check_pretrained(config, method, data)
    check_writable(workdir)
    return data, protocol, method


def check_resized_crop(config, data: RunData) -> None:
    """A ViT trained on `augment.resized_crop` squares must evaluate squares of that side too (its
    position embeddings are per patch): the stored images' or `model.kwargs.resize`'s."""
    side = config.augment.get("resized_crop", 0)
    if not side or not data.is_image or config.model.name != "vit":
        return
    evaluated = config.model.kwargs.get("resize", 0) or data.x_train.shape[1:3]
    if evaluated not in (side, (side, side)):
        raise ValueError(
            f"augment.resized_crop={side} trains the ViT on {side}x{side} images, but it evaluates "
            f"{evaluated}; set model.kwargs.resize={side}."
        )


def check_scenario(config, method: Method) -> None:
    """Refuses a method that cannot run the config's scenario (`Method.scenario_problem`, the one
    rule), and settings the scenario contradicts, before any data is loaded."""
    scenario = scenario_of(config)
    problem = method.scenario_problem(scenario)
    if problem:
        raise ValueError(
            f"Method {method.name!r} cannot run protocol.scenario={scenario!r}: {problem}"
        )
    if scenario == "domain" and config.protocol.get("blurry", 0.0):
        raise ValueError(
            "protocol.blurry mixes earlier phases' classes into later phases; in the domain "
            "scenario every phase has every class. Set protocol.blurry=0."
        )


def check_given_model(config, method, data: RunData, protocol: Protocol) -> None:
    """`model.init_from` fits the configured phase-0 model and names its classes (if it does)."""
    from incremental.phase import pretrained

    path = config.model.init_from
    first = protocol.class_order[: protocol.phase_sizes[0]]
    pretrained.check_names(path, [protocol.name(int(c)) for c in first])
    model = phase_model(config, method, PhaseInfo(0, 0, protocol.phase_sizes[0]))
    example = jnp.zeros((1, *data.x_train.shape[1:]))
    target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example, train=False))
    target = {"params": target["params"], "batch_stats": target.get("batch_stats", {})}
    pretrained.fit(pretrained.read(path), target, path)


def check_pretrained(config, method, data: RunData) -> None:
    """`model.pretrained` loads into the configured phase-0 backbone (read once, here, so that a
    wrong file is refused before anything is written)."""
    model = phase_model(config, method, PhaseInfo(0, 0, 2))
    example = jnp.zeros((1, *data.x_train.shape[1:]))
    target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example, train=False))
    pretrained.load_backbone(config, target["params"].get("backbone", {}))


def check_writable(workdir: str) -> None:
    """Fails when `workdir` cannot be created or written."""
    # The nearest existing directory on the path: `os.makedirs` creates the rest (`runs/...` on a
    # fresh checkout). Anything else that exists there (a file) blocks it.
    probe = os.path.abspath(workdir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ValueError(
            f"The work directory {workdir} cannot be written ({probe} is not a writable "
            "directory); pass a --workdir you can write to."
        )


def make_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"The work directory {workdir} cannot be created ({error.strerror}); pass a --workdir "
            "you can write to."
        ) from None


def check_model_fits(config, method, data: RunData) -> None:
    """Fails early when the data's example shape does not suit the model."""
    model = phase_model(config, method, PhaseInfo(0, 0, 2))
    try:  # the init traced once per equal model in the process (`init_variables`)
        jax.eval_shape(lambda: init_variables(model, data.x_train[0], jax.random.PRNGKey(0)))
    except Exception as error:  # noqa: BLE001 -- any shape failure gets the same advice
        raise ValueError(
            f"Model {config.model.name!r} cannot take examples of shape {data.x_train.shape[1:]} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). Convolutional models "
            "need (H, W, C) images; use model.name=mlp for feature vectors."
        ) from None

"""Domain-incremental data: every class in every phase, the inputs transformed per phase.

`protocol.scenario='domain'` with `protocol.domains`:
  permute  phase 0 is the data as it is; phase d > 0 reorders the input's positions by a fixed
           permutation drawn from `protocol.domain_seed` (the pixels of an image, its channels kept
           together; the features of a vector): permuted MNIST (Goodfellow et al. 2013, Kirkpatrick
           et al. 2017, van de Ven et al. 2022's domain-incremental benchmark).
  rotate   phase d rotates every image by d * 180 / num_domains degrees about its centre (bilinear,
           zero fill, same size): rotated MNIST with evenly spaced angles (Lopez-Paz & Ranzato 2017
           draw them at random in [0, 180)). Images only.
  split    the classes, in the protocol's class order, cut into `num_domains` groups of k; phase d
           brings group d's examples, each labelled by its class's place in the group (0..k-1), so
           every phase has the same k classes ("first digit of the pair", ...): van de Ven et al.'s
           split MNIST in the domain scenario, the one their table compares with the other two.

`permute` and `rotate` are made offline, once, from the source as loaded: phase d's training and
test sets are the whole source's, transformed, so a run holds `num_domains` copies of the data.
None of them depends on the run's seed, so every seed of `config.seeds` (which share one load) and
every run of a sweep sees the same domains.

Why a protocol key and not a source name (`permuted:digits`): the transform defines the phases,
which is the protocol's business, and it applies to any source (digits, mnist1d, npz, tfds) without
a second name for each; the source keeps naming the data only.

Datasets of the tfds catalogue with natural domains (same classes, another input distribution per
domain; not wired here, each would be one source per phase): `domainnet/{real, painting, clipart,
quickdraw, infograph, sketch}` (345 classes), `mnist_corrupted/<corruption>` (15 corruptions of
MNIST and `identity`), `cifar10_corrupted/<corruption>_<severity>` (19 corruptions x 5 severities,
test split only), `imagenet2012_corrupted` (validation only), `imagenet_r`, `imagenet_sketch`,
`imagenet_a`, `imagenet_v2` (ImageNet classes redrawn, evaluation only) and `smallnorb` (5 toy
classes under varied lighting, elevation and azimuth).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from incremental.data.sources import Source

DOMAINS = ("permute", "rotate", "split")
MAX_COPIES_BYTES = 8 << 30  # refuse a domain set larger than this in host memory


class DomainData(NamedTuple):
    """The source with every domain's copy appended, and the phase (domain) of each example."""

    source: Source
    train_domain: np.ndarray  # (N_train * num_domains,) int
    test_domain: np.ndarray


def permutations(shape: tuple[int, ...], is_image: bool, num_domains: int, seed: int):
    """One permutation of the input's positions per domain, the identity first."""
    positions = int(np.prod(shape[:-1] if is_image else shape))
    rng = np.random.default_rng(seed)
    return [np.arange(positions)] + [rng.permutation(positions) for _ in range(num_domains - 1)]


def permute(x: np.ndarray, order: np.ndarray, is_image: bool) -> np.ndarray:
    """`x` with its positions reordered: an image's pixels (channels kept together) or the
    features of a vector, the same order for every example."""
    n = x.shape[0]
    flat = x.reshape(n, -1, x.shape[-1]) if is_image else x.reshape(n, -1)
    return flat[:, order].reshape(x.shape)


def rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    """Images (N, H, W, C) rotated by `degrees` counter-clockwise, bilinear, zero fill, same size
    and dtype (integers rounded and clipped to the dtype's range)."""
    if degrees == 0:
        return x.copy()
    from scipy import ndimage  # scikit-learn's dependency; only rotated domains need it

    turned = ndimage.rotate(
        x.astype(np.float32), degrees, axes=(1, 2), reshape=False, order=1, mode="constant"
    )
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        turned = np.clip(np.rint(turned), info.min, info.max)
    return turned.astype(x.dtype)


def angles(num_domains: int) -> list[float]:
    """The rotation of each domain in degrees: evenly spaced over [0, 180)."""
    return [d * 180.0 / num_domains for d in range(num_domains)]


def transforms(kind: str, source: Source, num_domains: int, seed: int) -> list:
    """One function `x -> x` per domain, the first the identity."""
    if kind not in DOMAINS:
        raise ValueError(f"protocol.domains must be one of {DOMAINS}, got {kind!r}.")
    if kind == "rotate":
        if not source.is_image:
            raise ValueError(
                f"protocol.domains='rotate' turns images, but {source.name} holds feature vectors "
                f"of shape {source.x_train.shape[1:]}; use protocol.domains='permute'."
            )
        return [lambda x, a=a: rotate(x, a) for a in angles(num_domains)]
    orders = permutations(source.x_train.shape[1:], source.is_image, num_domains, seed)
    return [lambda x, o=o: permute(x, o, source.is_image) for o in orders]


def split(source: Source, num_domains: int, order) -> DomainData:
    """The `split` domains: `order`'s classes cut into `num_domains` groups of k; each example is
    labelled by its class's place in its group, and its domain is the group."""
    if source.num_classes % num_domains:
        raise ValueError(
            f"protocol.domains='split' cuts the {source.num_classes} classes into "
            f"protocol.num_domains={num_domains} equal groups; pick a number that divides "
            f"{source.num_classes}."
        )
    k = source.num_classes // num_domains
    place = np.empty(source.num_classes, np.int64)
    place[np.asarray(order)] = np.arange(source.num_classes)
    y_train, y_test = place[source.y_train], place[source.y_test]
    labelled = source._replace(
        y_train=(y_train % k).astype(np.int32), y_test=(y_test % k).astype(np.int32),
        num_classes=k, class_names=None,
    )  # fmt: skip
    return DomainData(labelled, y_train // k, y_test // k)


def make_domains(source: Source, kind: str, num_domains: int, seed: int, order=None) -> DomainData:
    """The domains of `source` (module doc), each example with its domain; `order` is the class
    order `split` groups (default: the class ids' own)."""
    if num_domains < 1:
        raise ValueError(f"protocol.num_domains must be >= 1, got {num_domains}.")
    if kind == "split":
        return split(source, num_domains, range(source.num_classes) if order is None else order)
    size = (source.x_train.nbytes + source.x_test.nbytes) * num_domains
    if size > MAX_COPIES_BYTES:
        raise ValueError(
            f"{num_domains} domains of {source.name} take {size / 2**30:.1f} GiB in host memory, "
            f"over the {MAX_COPIES_BYTES >> 30} GiB limit; use fewer domains or fewer classes "
            "(dataset.classes)."
        )
    fns = transforms(kind, source, num_domains, seed)
    x_train = np.concatenate([fn(source.x_train) for fn in fns])
    x_test = np.concatenate([fn(source.x_test) for fn in fns])
    domain_of = lambda n: np.repeat(np.arange(num_domains), n)  # noqa: E731
    copies = source._replace(
        x_train=x_train,
        y_train=np.tile(source.y_train, num_domains),
        x_test=x_test,
        y_test=np.tile(source.y_test, num_domains),
    )
    return DomainData(copies, domain_of(len(source.y_train)), domain_of(len(source.y_test)))

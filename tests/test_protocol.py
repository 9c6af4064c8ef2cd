import numpy as np
import pytest
from ml_collections import ConfigDict

from incremental.protocol import make_class_order, make_phase_sizes, make_protocol


def protocol_cfg(**overrides):
    cfg = ConfigDict(
        dict(
            class_order="seeded",
            class_order_seed=1993,
            init_classes=0,
            increment=10,
            phase_sizes="",
        )
    )
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize(
    "num_classes, init, inc, expected",
    [
        (100, 0, 10, [10] * 10),
        (100, 50, 10, [50] + [10] * 5),
        (100, 50, 5, [50] + [5] * 10),
        (100, 0, 20, [20] * 5),
        (10, 2, 2, [2] * 5),
    ],
)
def test_schedules(num_classes, init, inc, expected):
    assert list(make_phase_sizes(num_classes, init, inc)) == expected


@pytest.mark.parametrize("cfg", [protocol_cfg(), protocol_cfg(init_classes=50, increment=5)])
def test_phases_are_disjoint_and_cover_all_classes(cfg):
    protocol = make_protocol(100, cfg)
    labels = [set(protocol.phase_labels(p)) for p in range(protocol.num_phases)]
    assert sum(len(s) for s in labels) == 100
    assert set().union(*labels) == set(range(100))
    originals = [set(np.asarray(protocol.class_order)[list(s)]) for s in labels]
    assert set().union(*originals) == set(range(100))


def test_seed_1993_order_is_the_icarl_order_and_reproducible():
    order = make_class_order(100, "seeded", 1993)
    np.random.seed(1993)  # noqa: NPY002 -- the legacy recipe iCaRL and PyCIL use
    assert order == tuple(np.random.permutation(100))  # noqa: NPY002
    assert make_class_order(100, "seeded", 1993) == order
    assert make_class_order(100, "seeded", 1) != order
    assert order[:5] == (68, 56, 78, 8, 23)  # PyCIL's CIFAR-100 order starts like this


def test_remap_puts_labels_at_their_order_position():
    protocol = make_protocol(4, protocol_cfg(class_order="2,0,3,1", increment=2))
    assert protocol.remap(np.array([2, 0, 3, 1])).tolist() == [0, 1, 2, 3]
    assert protocol.phase_of(np.array([0, 1, 2, 3])).tolist() == [0, 0, 1, 1]
    assert protocol.num_seen(0) == 2


def test_explicit_phase_sizes_and_natural_order():
    protocol = make_protocol(10, protocol_cfg(class_order="natural", phase_sizes="5,1,1,1,1,1"))
    assert protocol.phase_sizes == (5, 1, 1, 1, 1, 1)
    assert protocol.class_order == tuple(range(10))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(phase_sizes="4,4"), "sum to 8"),
        (dict(phase_sizes="5,0,5"), "empty"),
        (dict(phase_sizes=",".join(["1"] * 11)), "only 10 classes"),
        (dict(class_order="0,1,2,3,4,5,6,7,8,12"), r"\[12\]"),
        (dict(class_order="0,1,2,3,4,5,6,7,8,8"), "exactly once"),
        (dict(class_order="a,b"), "comma-separated"),
        (dict(increment=3), "increment=3"),
        (dict(init_classes=11), "outside"),
        (dict(increment=0), "positive"),
    ],
)
def test_bad_schedules_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_protocol(10, protocol_cfg(**overrides))

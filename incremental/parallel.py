"""Data parallelism over a device mesh: one host or many, through JAX's own runtime.

The mesh has one axis, `data`, over every device of every process (or the first
`config.parallel.devices`). Each train step's batch is sharded over it; parameters, optimizer state,
method state and the device-resident training data are replicated. XLA partitions the step and
inserts the gradient all-reduce, so the numbers are those of one device up to float summation order.

Several hosts: `config.parallel.coordinator` (or JAX's own environment variables on a cluster that
sets them) starts `jax.distributed`; every process then runs the same program on the same data,
arrays span all processes' devices, and only process 0 writes results (orbax checkpoints are written
by all processes together, as orbax requires).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
DATA = "data"


def initialize(config) -> None:
    """Starts `jax.distributed` when `config.parallel.coordinator` is set (once per process)."""
    p = config.parallel
    if not p.coordinator or jax.distributed.is_initialized():
        return
    if p.num_processes < 1 or not 0 <= p.process_id < p.num_processes:
        raise ValueError(
            f"parallel.process_id must be in [0, parallel.num_processes); got process_id "
            f"{p.process_id} of num_processes {p.num_processes}."
        )
    jax.distributed.initialize(
        coordinator_address=p.coordinator,
        num_processes=p.num_processes,
        process_id=p.process_id,
        local_device_ids=None,
    )


def make_mesh(devices: int = 0) -> Mesh:
    """A one-axis (`data`) mesh over all devices, or the first `devices` of them."""
    available = jax.devices()
    if devices < 0 or devices > len(available):
        raise ValueError(
            f"parallel.devices={devices} but {len(available)} devices are available "
            f"({available[0].platform}); use 0 for all of them."
        )
    return Mesh(np.array(available[: devices or len(available)]), (DATA,))


def check_batch(mesh: Mesh, batch_size: int, what: str = "train.batch_size") -> None:
    """The global batch must split evenly over the devices of the `data` axis."""
    n = mesh.shape[DATA]
    if batch_size % n:
        raise ValueError(
            f"{what}={batch_size} does not divide over the {n} devices of the mesh; use a "
            f"multiple of {n} (e.g. {max(n, batch_size - batch_size % n)}) or set parallel.devices."
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array leaf of `tree` (host or device) as a copy on every device of the mesh."""
    return place(tree, mesh, lambda leaf: replicated(mesh))


def onto(tree: PyTree, mesh: Mesh) -> PyTree:
    """`tree` with every leaf not yet placed on `mesh` replicated onto it (the others as they are).

    A jitted function's outputs are placed on the mesh of its inputs; feeding it inputs placed the
    same way from the first call on keeps it from compiling again for the second."""

    def sharding_of(leaf):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return sharding
        return replicated(mesh)

    return place(tree, mesh, sharding_of)


def shard_large(tree: PyTree, mesh: Mesh, min_size: int) -> PyTree:
    """FSDP-style placement: a leaf of at least `min_size` elements whose first axis divides over
    the devices is split along that axis over `data`; the others are replicated. XLA gathers the
    pieces where the step needs them, so each device holds a share of the large parameters (and of
    their optimizer moments) between steps."""
    n = mesh.shape[DATA]

    def sharding(leaf):
        shape = np.shape(leaf)
        if shape and shape[0] % n == 0 and np.size(leaf) >= min_size:
            return batch_sharding(mesh)
        return replicated(mesh)

    return place(tree, mesh, sharding)


def place(tree: PyTree, mesh: Mesh, sharding_of) -> PyTree:
    """Every array leaf of `tree` put on `mesh` with `sharding_of(leaf)`, on one host or many."""

    def put(leaf):
        sharding = sharding_of(leaf)
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        if jax.process_count() == 1 or (
            isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        ):
            return jax.device_put(leaf, sharding)  # one host, or a global array resharded
        host = np.asarray(to_host(leaf))  # the same value in every process
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def to_host(tree: PyTree) -> PyTree:
    """numpy copies of `tree`'s arrays; a replicated array spanning other processes is read locally."""

    def get(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                raise ValueError("to_host reads replicated arrays only; this one is sharded.")
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(jax.device_get(leaf))  # explicit: allowed under a transfer guard

    return jax.tree.map(get, tree)


def mesh_of(tree: PyTree) -> Mesh | None:
    """The mesh that `tree`'s first array is placed on with a `NamedSharding`, or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def is_main_process() -> bool:
    """Process 0 writes results and logs; every process takes part in checkpoints."""
    return jax.process_index() == 0


def with_sharding(target: PyTree, mesh: Mesh) -> PyTree:
    """Shapes and dtypes (`jax.ShapeDtypeStruct`s) to restore into, replicated on `mesh`."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), target)

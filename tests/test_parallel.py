"""Data parallelism on 4 CPU devices: the batch is sharded and the numbers are one device's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh process: the device count is fixed when JAX starts.
SCRIPT = r"""
import dataclasses, json, sys
import jax
sys.path.insert(0, ".")
from configs import digits
from incremental import run as run_lib
from incremental.methods import METHODS
from incremental.methods.replay import Replay

seen, kernels = [], []

@dataclasses.dataclass(frozen=True)
class Inspecting(Replay):
    name = "inspecting"

    def loss(self, out, batch, *, params, **kwargs):
        jax.debug.inspect_array_sharding(batch.x, callback=lambda s: seen.append(str(s.spec)))
        jax.debug.inspect_array_sharding(out.logits, callback=lambda s: seen.append(str(s.spec)))
        kernel = params["backbone"]["dense0"]["kernel"]
        jax.debug.inspect_array_sharding(kernel, callback=lambda s: kernels.append(str(s.spec)))
        return super().loss(out, batch, params=params, **kwargs)

METHODS["inspecting"] = Inspecting
out = {"device_count": jax.device_count()}
for devices, shard, wide in ((1, False, 0), (4, False, 0), (4, True, 0), (4, False, 10)):
    config = digits.get_config("method=inspecting")
    config.train.epochs = config.train_first.epochs = 3
    config.protocol.phase_sizes = "4,6"  # phase 1 trains on new data and the memory
    config.log.progress = config.log.plot = False
    config.parallel.devices = devices
    config.parallel.shard_params, config.parallel.shard_min_size = shard, 1000
    config.head.capacity = wide
    seen.clear()
    kernels.clear()
    name = f"{devices}" + ("-sharded" if shard else "") + ("-capacity" if wide else "")
    results = run_lib.run(config, sys.argv[1] + "/" + name)
    out[name] = {
        "matrix": results["accuracy_matrix"],
        "nme": results["nme_accuracy_matrix"],
        "losses": [p["final_loss"] for p in results["phases"]],
        "specs": sorted(set(seen)),
        "kernel_specs": sorted(set(kernels)),
    }
config.parallel.devices = 4
config.head.capacity = 0
config.train.batch_size = 30
try:
    run_lib.run(config, sys.argv[1] + "/bad")
except ValueError as error:
    out["bad_batch"] = str(error)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags}
    workdir = tmp_path_factory.mktemp("parallel")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(workdir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_batch_is_sharded_over_the_devices(four_devices):
    assert four_devices["device_count"] == 4
    # The step's batch and its logits are split on the mesh's `data` axis; one device: nothing is.
    assert four_devices["4"]["specs"] == ["P('data',)"]
    assert "P('data',)" not in four_devices["1"]["specs"]


def test_four_devices_give_one_devices_numbers(four_devices):
    one, four = four_devices["1"], four_devices["4"]
    # Gradients are summed in another order, so losses agree to float32 rounding; on this run
    # every test prediction is the same.
    assert four["matrix"] == one["matrix"]
    assert four["nme"] == one["nme"]
    for a, b in zip(one["losses"], four["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))


def test_a_batch_that_does_not_divide_is_refused(four_devices):
    message = four_devices["bad_batch"]
    assert "train.batch_size=30" in message and "4 devices" in message


def test_large_parameters_can_be_split_over_the_devices(four_devices):
    """parallel.shard_params: the (64, 256) first-layer kernel is split over `data`, numbers kept."""
    sharded, replicated = four_devices["4-sharded"], four_devices["4"]
    assert sharded["kernel_specs"] == ["P('data',)"] and replicated["kernel_specs"] == ["P()"]
    assert sharded["matrix"] == replicated["matrix"] and sharded["nme"] == replicated["nme"]
    for a, b in zip(sharded["losses"], replicated["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))


def test_capacity_programs_shard_the_batch_and_keep_the_numbers(four_devices):
    """head.capacity on 4 devices: the phase's rows are gathered from the whole training set."""
    wide, widened = four_devices["4-capacity"], four_devices["4"]
    assert wide["specs"] == ["P('data',)"]
    assert wide["matrix"] == widened["matrix"] and wide["nme"] == widened["nme"]
    for a, b in zip(wide["losses"], widened["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))

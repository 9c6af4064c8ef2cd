"""Shared by the predict and export tests: a short digits run and the test examples as files."""

import numpy as np
from shared_runs import shared_run

from configs import digits
from incremental import run as run_lib
from incremental import workdirs


def small_config(method: str = "replay"):
    """Digits in 3 phases of 4 + 3 + 3 classes, 2 epochs each."""
    config = digits.get_config(f"method={method}")
    config.train.epochs = config.train_first.epochs = 2
    config.train.milestones = config.train_first.milestones = (1,)
    config.protocol.init_classes, config.protocol.increment = 4, 3
    config.log.progress = config.log.plot = False
    return config


def trained(tmp_path_factory, method: str = "replay", *, stop_after: int | None = None) -> str:
    """The work directory of a short run of `method`, made once for the session (the predict and
    export tests, on two workers, read the same one)."""
    del tmp_path_factory
    name = f"predict-{method}-{stop_after}"
    return shared_run(name, lambda w: run_lib.run(small_config(method), w, stop_after=stop_after))


def seen_test_examples(workdir: str, phase: int | None = None) -> np.ndarray:
    """The test examples of the classes seen by the saved phase, in test-set order (what
    `workdirs.evaluate_saved(..., predictions=True)` predicts)."""
    rs, saved = workdirs.restore(workdir, phase)
    return rs.data.x_test[rs.data.y_test < rs.protocol.num_seen(saved.phase)]


def write_npz(path, x: np.ndarray) -> str:
    np.savez(path, x=x)
    return str(path)

"""Records, or checks, the results.json of the digits config for every method (seed 0).

A refactoring of the phase loop must not change a number a user sees. This script runs
`configs/digits.py:method=NAME` for every registered method and keeps each results.json without the
keys that are not results (timings, the config, the library versions):

    python scripts/golden.py --out=tests/golden/digits_full.json              # record
    python scripts/golden.py --check=tests/golden/digits_full.json            # compare, exit 1 on a diff
    python scripts/golden.py --quick --out=tests/golden/digits_quick.json     # the tests' shortened runs
    python scripts/golden.py --methods=ewc --update=tests/golden/digits_full.json  # a meant change

`--update` re-records only `--methods` in an existing file: for a change of a method's numbers that is
intended (and said in the commit), leaving every other method's record as it was.

`--quick` shortens every run (3 phases, 2 epochs); `tests/test_golden.py` runs that variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Keys of a results document that vary from run to run or machine to machine, not results.
VOLATILE = ("seconds", "compile_cache_hits", "config", "versions", "startup")
# The key of a golden file that holds the environment it was recorded in (not a method).
ENVIRONMENT = "_environment"


def quick(config):
    """The tests' shortened variant of a digits config: 3 phases of 2 classes, 2 epochs each."""
    config.dataset.classes = "seeded:6"
    config.train.epochs = config.train_first.epochs = 2
    config.train.milestones = config.train_first.milestones = (1,)
    if "compression_epochs" in config.method_args:
        config.method_args.compression_epochs = 2
    config.log.progress = config.log.plot = False
    config.compile_cache = ""
    return config


def strip(doc):
    """`doc` without its volatile keys, at any depth."""
    if isinstance(doc, dict):
        return {k: strip(v) for k, v in doc.items() if not any(s in k for s in VOLATILE)}
    if isinstance(doc, list):
        return [strip(v) for v in doc]
    return doc


def record(names, shortened: bool) -> dict:
    from configs import digits
    from incremental import run as run_lib

    out = {}
    for name in names:
        config = digits.get_config(f"method={name}")
        config.log.progress = config.log.plot = False
        if shortened:
            config = quick(config)
        with tempfile.TemporaryDirectory() as workdir:
            out[name] = strip(run_lib.run(config, workdir))
        print(f"{name}: last accuracy {out[name]['last_accuracy']:.4f}", flush=True)
    return out


def environment() -> dict:
    """What the numbers depend on besides the code: bit-identical results need the same versions and
    platform (another XLA or CPU may reorder a float reduction)."""
    import platform

    import jax
    import jaxlib
    import numpy as np

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": cpu_features(),
        "backend": jax.default_backend(),
    }


def cpu_features() -> str:
    """The vector instruction sets XLA:CPU may compile for (Linux's /proc/cpuinfo flags): two x86
    machines with the same versions gave DER's losses 1e-7 apart when their sets differed."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return ""
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))))


def differences(expected: dict, actual: dict, path: str = "") -> list[str]:
    """Every path at which two documents differ (exactly: floats compared bit for bit). A key only
    in `actual` is a later addition to the document (a new result, a new config key with its
    default), not a difference; a key lost is one."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [
            d
            for k in sorted(expected)
            for d in (
                differences(expected[k], actual[k], f"{path}/{k}")
                if k in actual
                else [f"{path}/{k}: only in expected"]
            )
        ]
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [
            d
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for d in differences(e, a, f"{path}/{i}")
        ]
    return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]


def main() -> int:
    from incremental.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the recorded documents here")
    parser.add_argument("--check", help="compare with the documents in this file")
    parser.add_argument("--update", help="re-record --methods in this existing file")
    parser.add_argument("--quick", action="store_true", help="the tests' shortened runs")
    parser.add_argument(
        "--methods", default="", help="comma-separated subset (default: --check's, or all)"
    )
    args = parser.parse_args()
    names = args.methods.split(",") if args.methods else sorted(METHODS)
    if args.check and not args.methods:  # the methods recorded there (not the ViT-only ones)
        with open(args.check) as f:
            names = sorted(set(json.load(f)) - {ENVIRONMENT})
    actual = record(names, args.quick)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({ENVIRONMENT: environment(), **actual}, f, indent=1, sort_keys=True)
            f.write("\n")
    if args.update:
        with open(args.update) as f:
            recorded = json.load(f)
        if recorded.get(ENVIRONMENT) != environment():
            raise SystemExit(
                f"{args.update} was recorded in {recorded.get(ENVIRONMENT)}; re-record all"
            )
        with open(args.update, "w") as f:
            json.dump({**recorded, **actual}, f, indent=1, sort_keys=True)
            f.write("\n")
    if args.check:
        with open(args.check) as f:
            recorded = json.load(f)
        if recorded.get(ENVIRONMENT) != environment():
            print(f"note: recorded in {recorded.get(ENVIRONMENT)}, checked in {environment()}")
        expected = {k: v for k, v in recorded.items() if k in actual}
        diffs = differences(expected, actual)
        print("\n".join(diffs) if diffs else f"identical: {', '.join(names)}")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile cost of widening the head against `head.capacity`, and whether their numbers agree.

    python experiments/capacity.py --out=experiments/capacity.md

Two settings, each run twice in one process (widening, then capacity, then both again in the other
order, so that neither gains from JAX's warm-up), with the persistent compilation cache off:

- `digits`: the default config with replay, 5 phases of 2 classes (MLP, scan of each epoch);
- `resnet32`: ResNet-32 on synthetic CIFAR-shaped data (100 classes, 20 training and 5 test images
  per class, uint8), B0-Inc10 with finetune, 1 epoch per phase: what compiling costs a CIFAR-100 run;
- `coda_prompt`: CODA-Prompt on a small ViT (width 64, 4 blocks, digits resized to 16x16, patches
  of 4), prompts in every block, a pool of 10 in 5 slices, 5 phases of 2 classes, 1 epoch per
  phase: the prompt methods, whose ViT takes the phase as an input (`Method.phase_input`).

For each run: seconds of compiling per phase (`results.json`'s `compile_seconds`), the seconds in
phases, and whether the accuracy matrices and final losses equal the widening run's.
"""

import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import cifar100, digits  # noqa: E402
from incremental import run as run_lib  # noqa: E402

flags.DEFINE_string("out", None, "Markdown file to write (default: print only).")
flags.DEFINE_list("settings", ["digits", "resnet32", "coda_prompt"], "Which settings to run.")
FLAGS = flags.FLAGS
CODA_VIT = {"width": 64, "depth": 4, "heads": 4, "mlp_dim": 128, "patch": 4, "resize": 16}


def synthetic_cifar(path: str, per_class: int = 20, test_per_class: int = 5) -> str:
    rng = np.random.default_rng(0)

    def split(n):
        y = np.repeat(np.arange(100), n)
        x = rng.integers(0, 256, size=(len(y), 32, 32, 3), dtype=np.uint8)
        return x, y

    (x_train, y_train), (x_test, y_test) = split(per_class), split(test_per_class)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def config_for(setting: str, capacity: int, tmp: str):
    if setting == "digits":
        config = digits.get_config("method=replay")
        config.head.capacity = 10 if capacity else 0
    elif setting == "coda_prompt":
        config = digits.get_config("method=coda_prompt,model=vit")
        config.model.kwargs = dict(CODA_VIT)
        config.method_args.update(layers=(0, 1, 2, 3), pool_size=10, num_phases=5)
        config.train.epochs = config.train_first.epochs = 1
        config.train.weight_decay = config.train_first.weight_decay = 0.0
        config.head.capacity = 10 if capacity else 0
    else:
        config = cifar100.get_config("method=finetune,protocol=b0_inc10")
        config.dataset.name = "npz:" + synthetic_cifar(os.path.join(tmp, "cifar.npz"))
        config.train.epochs = config.train_first.epochs = 1
        config.head.capacity = 100 if capacity else 0
    config.compile_cache = ""
    config.log.progress = config.log.plot = False
    return config


def one_run(setting: str, capacity: bool, tmp: str) -> dict:
    config = config_for(setting, capacity, tmp)
    start = time.perf_counter()
    results = run_lib.run(config, tempfile.mkdtemp(dir=tmp))
    results["wall_seconds"] = time.perf_counter() - start
    return results


def summary(setting: str, runs: dict) -> list[str]:
    lines = [
        f"### {setting}",
        "",
        "| head | order | compile s per phase | compile s | s in phases "
        "| wall s | matrices equal widening's | max loss rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reference = runs[("widen", 0)]
    ref_losses = np.array([p["final_loss"] for p in reference["phases"]])
    for (mode, order), r in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        compile_s = [p["compile_seconds"] for p in r["phases"]]
        in_phases = sum(p["train_seconds"] + p["eval_seconds"] for p in r["phases"])
        same = r["accuracy_matrix"] == reference["accuracy_matrix"] and r.get(
            "nme_accuracy_matrix"
        ) == reference.get("nme_accuracy_matrix")
        loss = np.array([p["final_loss"] for p in r["phases"]])
        diff = float(np.max(np.abs(loss - ref_losses) / np.maximum(np.abs(ref_losses), 1e-12)))
        lines.append(
            f"| {mode} | {'first' if order == 0 else 'second'} | "
            f"{', '.join(f'{c:.2f}' for c in compile_s)} | {sum(compile_s):.1f} | {in_phases:.1f} | "
            f"{r['wall_seconds']:.1f} | {'yes' if same else 'no'} | {diff:.1e} |"
        )
    return lines


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    out = ["# Widening the head against `head.capacity`", "", __doc__.split("\n\n", 2)[2], ""]
    with tempfile.TemporaryDirectory() as tmp:
        for setting in FLAGS.settings:
            runs = {}
            for order, modes in enumerate((("widen", "capacity"), ("capacity", "widen"))):
                for mode in modes:
                    runs[(mode, order)] = one_run(setting, mode == "capacity", tmp)
                    print(setting, mode, order, f"{runs[(mode, order)]['wall_seconds']:.1f} s")
            out += summary(setting, runs) + [""]
    text = "\n".join(out)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)

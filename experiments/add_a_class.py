"""Add a class to a trained classifier: each of the seed's answers, measured.

    python experiments/add_a_class.py --out=experiments/add_a_class.md [--epochs=10]
    python experiments/add_a_class.py --write_folders=DIR   # only the image folders of the README

A classifier is trained on three classes of the bundled digits, written as PNG folders (`zero`,
`one`, `two`, with train/ and test/), then a fourth (`three`) is added with `incremental learn`
under each answer: retrain on everything (`joint`), replace/widen the head and retrain on the new
data (`finetune`), freeze the features and train a wider head on old and new data
(`freeze_backbone`), train only the new weights without the old data (`new_head_only`), and the
class-incremental methods `replay`, `icarl` and `analytic`. The table holds the accuracy on the
three old classes and on the new one after learning it, the accuracy on all four, and the seconds
of each step; it is what the README's "Add a class to your classifier" shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OLD, NEW = ("zero", "one", "two"), ("three",)
METHODS = ("joint", "finetune", "freeze_backbone", "new_head_only", "replay", "icarl", "analytic")


def write_folders(directory: str) -> tuple[str, str]:
    """The digits 0-2 as DIR/three_classes/{train,test}/<name>/*.png, the digit 3 as DIR/new_class."""
    from PIL import Image

    from incremental.data import sources

    digits = sources.load_source("digits")
    scale = 255 // int(max(digits.x_train.max(), 1))  # 0..16 -> 0..255, exactly
    folders = []
    for folder, names, first in (("three_classes", OLD, 0), ("new_class", NEW, len(OLD))):
        for split, x, y in (("train", digits.x_train, digits.y_train), ("test", digits.x_test, digits.y_test)):  # fmt: skip
            for k, name in enumerate(names):
                path = os.path.join(directory, folder, split, name)
                os.makedirs(path, exist_ok=True)
                for i in np.flatnonzero(y == first + k):
                    image = (x[i, :, :, 0].astype(np.int32) * scale).astype(np.uint8)
                    Image.fromarray(image).save(os.path.join(path, f"{i}.png"))
        folders.append(os.path.join(directory, folder))
    return folders[0], folders[1]


def config_for(method: str, folder: str, epochs: int):
    from configs import digits

    config = digits.get_config(f"method={method}")
    config.dataset.name = f"folder:{folder}"
    config.protocol.init_classes, config.protocol.increment = len(OLD), 1
    config.train.epochs = config.train_first.epochs = epochs
    config.memory.budget = 60  # 20 images per old class for the rehearsal methods
    config.log.progress = config.log.plot = False
    return config


def one_answer(method: str, old: str, new: str, workdir: str, epochs: int) -> dict:
    """Train on the three classes, learn the fourth; the numbers of the table's row."""
    from incremental import learn
    from incremental import run as run_lib

    start = time.perf_counter()
    first = run_lib.run(config_for(method, old, epochs), os.path.join(workdir, method))
    trained = time.perf_counter() - start
    start = time.perf_counter()
    results = learn.learn(os.path.join(workdir, method), f"folder:{new}", workdir + f"/{method}+3")
    learned = time.perf_counter() - start
    return {
        "method": method,
        "three": first["accuracy"][-1],
        "old": results["old_accuracy"][-1],
        "new": results["new_accuracy"][-1],
        "all": results["accuracy"][-1],
        "train s": trained,
        "learn s": learned,
    }


def table(rows: list[dict], epochs: int) -> str:
    lines = [
        f"Digits written as PNG folders: three classes ({', '.join(OLD)}), then `incremental learn` "
        f"adds `three`; {epochs} epochs each, seed 0, accuracies in % on the test images, seconds "
        "on 2 CPU cores (compiles included). Regenerate: `python experiments/add_a_class.py "
        "--out=experiments/add_a_class.md`.",
        "",
        "| answer | 3 classes, before | old 3, after | new class | all 4 | train s | learn s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{100 * r[k]:.1f}" for k in ("three", "old", "new", "all")]
        cells += [f"{r['train s']:.1f}", f"{r['learn s']:.1f}"]
        lines.append(f"| `{r['method']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="the Markdown file to write")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--write_folders", default=None, help="only write the image folders here")
    args = parser.parse_args()
    if args.write_folders:
        print("\n".join(write_folders(args.write_folders)))
        return
    with tempfile.TemporaryDirectory() as directory:
        old, new = write_folders(os.path.join(directory, "images"))
        rows = [
            one_answer(m, old, new, os.path.join(directory, "runs"), args.epochs)
            for m in args.methods.split(",")
        ]
    text = "# Add a class to your classifier\n\n" + table(rows, args.epochs) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

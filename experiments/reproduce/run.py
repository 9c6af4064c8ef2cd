"""Runs the reproduction table (`targets.csv`) and prints our numbers beside the published ones.

    python experiments/reproduce/run.py --method=icarl --benchmark=cifar100_b0inc10   # one entry
    python experiments/reproduce/run.py --all              # every entry, one after another
    python experiments/reproduce/run.py --summary          # the table of what has finished
    python experiments/reproduce/run.py --all --smoke      # every entry, 1 epoch per phase, mock data

Each (method, benchmark) runs once in `--root/<benchmark>/<method>` (several metrics of the same run
are several rows of the table) and resumes from its checkpoints when started again, so `--all` can be
killed and restarted. Before a run starts, its work is printed in examples processed and GPU-hours at
`--images_per_second` (an assumed throughput, not a measurement: set it from `incremental benchmark`
on your accelerator). `--smoke` shrinks every config (2 phases of 5 classes, ResNet-8, 1 epoch) and
runs on tfds mock data: it checks the plumbing of every entry, never the numbers. See REPRODUCING.md.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets.csv")
# benchmark -> (config module under configs/, its protocol arg)
BENCHMARKS = {
    "cifar100_b0inc10": ("cifar100", "b0_inc10"),
    "cifar100_b50inc10": ("cifar100", "b50_inc10"),
    # ViT-B/16 ImageNet-21k (--weights), the pre-trained-model methods' protocol (PILOT)
    "vit_cifar100_b0inc10": ("vit_cifar100", "b0_inc10"),
}
PRETRAINED = ("vit_cifar100",)  # configs that take the checkpoint as `weights=`
TRAIN_EXAMPLES_PER_CLASS = {"cifar100": 500}

flags.DEFINE_string("method", "", "the entry's method (with --benchmark)")
flags.DEFINE_string("benchmark", "", f"one of {sorted(BENCHMARKS)}")
flags.DEFINE_bool("all", False, "run every entry of targets.csv")
flags.DEFINE_bool("summary", False, "print the table of finished runs and exit")
flags.DEFINE_bool("smoke", False, "1 epoch per phase of a shrunk config on tfds mock data")
flags.DEFINE_string("root", os.path.join(ROOT, "runs", "reproduce"), "where the runs live")
flags.DEFINE_string(
    "weights", "", "the pre-trained checkpoint of the vit_* benchmarks (e.g. ViT-B_16.npz)"
)
flags.DEFINE_float("images_per_second", 5000.0, "assumed training throughput for the estimate")


@dataclasses.dataclass(frozen=True)
class Target:
    method: str
    benchmark: str
    metric: str
    target: float  # percent
    tolerance: float  # percentage points
    source: str


def load_targets(path: str = TARGETS) -> list[Target]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    targets = [
        Target(r["method"], r["benchmark"], r["metric"], float(r["target"]), float(r["tolerance"]),
               r["source"])
        for r in rows
    ]  # fmt: skip
    for t in targets:
        if t.benchmark not in BENCHMARKS:
            raise ValueError(
                f"{path}: unknown benchmark {t.benchmark!r}; one of {sorted(BENCHMARKS)}."
            )
    return targets


def runs_of(targets: list[Target]) -> list[tuple[str, str]]:
    """The distinct (method, benchmark) runs of the targets, in file order."""
    return list(dict.fromkeys((t.method, t.benchmark) for t in targets))


def config_for(method: str, benchmark: str, smoke: bool = False):
    import importlib

    module, protocol = BENCHMARKS[benchmark]
    arg = f"method={method},protocol={protocol}"
    if module in PRETRAINED and flags.FLAGS.is_parsed() and flags.FLAGS.weights:
        arg += f",weights={flags.FLAGS.weights}"
    config = importlib.import_module(f"configs.{module}").get_config(arg)
    return shrink(config) if smoke else config


def shrink(config):
    """The smoke variant: 2 phases of 5 of 10 mock classes, ResNet-8 (a tiny random ViT for the
    pre-trained benchmarks, no checkpoint, with the 5 blocks and the width the prompt methods'
    default layers and CODA-Prompt's 100 orthonormal keys need), 1 epoch everywhere."""
    config.dataset.classes = "seeded:10"
    config.protocol.phase_sizes = "5,5"
    if config.model.name == "vit":
        config.model.kwargs = {"width": 128, "depth": 5, "heads": 2, "mlp_dim": 128, "patch": 8}
        config.model.pretrained, config.dtype, config.augment.resized_crop = "", "float32", 0
    else:
        config.model.kwargs = {"depth": 8}
    config.train.epochs = config.train_first.epochs = 1
    config.train.milestones = config.train_first.milestones = ()
    config.train.batch_size = 16
    config.log.progress = config.log.plot = False
    for key in ("compression_epochs", "bias_epochs"):
        if key in config.method_args:
            config.method_args[key] = 1
    if "projection_dim" in config.method_args:  # RanPAC's M: its 10000^2 Gram takes minutes
        config.method_args.projection_dim = 256
    if "bias_milestones" in config.method_args:
        config.method_args.bias_milestones = ()
    return config


def workdir_of(root: str, method: str, benchmark: str) -> str:
    return os.path.join(root, benchmark, method)


def estimate(config) -> tuple[int, float]:
    """(examples processed in training, GPU-hours at --images_per_second): a rough count that
    ignores growing backbones' extra forward passes and evaluation."""
    from incremental import protocol as protocol_lib

    module = config.dataset.name.split(":")[-1]
    per_class = TRAIN_EXAMPLES_PER_CLASS.get(module, 500)
    p = config.protocol
    sizes = protocol_lib.make_phase_sizes(100, p.init_classes, p.increment, p.phase_sizes)
    memory = config.memory.budget if config.memory.budget else 0
    total = 0
    for phase, size in enumerate(sizes):
        epochs = (config.train_first if phase == 0 else config.train).epochs
        examples = size * per_class + (memory if phase else 0)
        total += epochs * examples
        total += config.method_args.get("compression_epochs", 0) * examples
    return total, total / flags.FLAGS.images_per_second / 3600


def run_one(method: str, benchmark: str, *, smoke: bool, root: str) -> dict:
    from incremental import run as run_lib

    config = config_for(method, benchmark, smoke)
    workdir = workdir_of(root, method, benchmark)
    if smoke:
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=1000, policy=tfds.testing.MockPolicy.USE_CODE):
            return run_lib.run(config, workdir)
    examples, hours = estimate(config)
    print(f"{method} on {benchmark}: about {examples / 1e6:.1f}M training examples, "
          f"{hours:.1f} GPU-hours at {flags.FLAGS.images_per_second:.0f} images/s (assumed)")  # fmt: skip
    return run_lib.run(config, workdir)


def summary(targets: list[Target], root: str) -> list[dict]:
    """One row per target: ours (percent) when its run is complete, else None."""
    rows = []
    for t in targets:
        path = os.path.join(workdir_of(root, t.method, t.benchmark), "results.json")
        ours = None
        if os.path.exists(path):
            with open(path) as f:
                doc = json.load(f)
            if doc.get("complete") and doc.get(t.metric) is not None:
                ours = 100 * doc[t.metric]
        diff = None if ours is None else ours - t.target
        ok = None if diff is None else abs(diff) <= t.tolerance
        rows.append({**dataclasses.asdict(t), "ours": ours, "diff": diff, "within": ok})
    return rows


def print_summary(rows: list[dict]) -> None:
    print(f"{'method':8} {'benchmark':18} {'metric':29} {'target':>6} {'ours':>6} {'diff':>6}  ok")
    for r in rows:
        ours = "-" if r["ours"] is None else f"{r['ours']:.1f}"
        diff = "-" if r["diff"] is None else f"{r['diff']:+.1f}"
        ok = "" if r["within"] is None else ("yes" if r["within"] else "NO")
        print(f"{r['method']:8} {r['benchmark']:18} {r['metric']:29} {r['target']:6.1f} "
              f"{ours:>6} {diff:>6}  {ok}")  # fmt: skip


def main(argv):
    del argv
    f = flags.FLAGS
    targets = load_targets()
    if f.summary:
        print_summary(summary(targets, f.root))
        return
    if f.all:
        chosen = runs_of(targets)
    elif f.method and f.benchmark:
        if (f.method, f.benchmark) not in runs_of(targets):
            raise app.UsageError(
                f"No target for method={f.method} benchmark={f.benchmark}; the entries are "
                f"{', '.join(f'{m}/{b}' for m, b in runs_of(targets))}."
            )
        chosen = [(f.method, f.benchmark)]
    else:
        raise app.UsageError("Pass --method and --benchmark, or --all, or --summary.")
    root = os.path.join(f.root, "smoke") if f.smoke else f.root
    for method, benchmark in chosen:
        run_one(method, benchmark, smoke=f.smoke, root=root)
    print_summary([r for r in summary(targets, root) if (r["method"], r["benchmark"]) in chosen])


if __name__ == "__main__":
    app.run(main)

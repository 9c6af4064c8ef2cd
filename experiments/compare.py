"""Compare methods over seeds on the offline datasets and write a markdown table.

    python experiments/compare.py --methods=finetune,joint,replay,icarl --datasets=digits \\
        --seeds=0,1,2 --out=experiments/rehearsal.md --title="Rehearsal methods on digits"

A thin use of the project's own tools: the runs are an `incremental sweep` of each dataset's config
(configs/<dataset>.py with the method's defaults; class order from seed 1993; `config.seed`, the
initialisation and batch order, varies), two at a time, and the table is `incremental report`'s
(mean ± std over seeds, accuracies in %). `--workdir` keeps the runs (a second call reuses
finished ones); by default they go to a temporary directory.
"""

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from incremental import compare, sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="finetune,joint")
    parser.add_argument("--datasets", default="digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None, help="the Markdown file to write")
    parser.add_argument("--title", default="Comparison")
    parser.add_argument("--note", default="", help="a paragraph under the table")
    parser.add_argument("--workdir", default=None, help="where the runs go (kept)")
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or scratch
        for dataset in args.datasets.split(","):
            grid = f"method=[{args.methods}];seed=[{args.seeds}]"
            config = os.path.join(ROOT, "configs", f"{dataset}.py")
            sweep.run_sweep(config, os.path.join(workdir, dataset), grid, parallel=args.parallel)
        table, _ = compare.report([workdir])
    command = (
        f"`python experiments/compare.py --methods={args.methods} --datasets={args.datasets} "
        f"--seeds={args.seeds}`"
    )
    text = (
        f"# {args.title}\n\n{command}: 5 phases of 2 classes, class order from seed 1993, mean ± std "
        f"over training seeds {args.seeds}; accuracies in %, class-incremental (one head, no task "
        "label); NME only for methods with exemplars; seconds of training and compiling summed "
        f"over phases on 2 CPU cores. A run that diverged is left out of its row's count.\n\n"
        f"{table}\n" + (f"\n{args.note}\n" if args.note else "")
    )
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

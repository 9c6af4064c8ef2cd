"""The command line.

    incremental run [--config=configs/NAME.py[:ARG]] [--config.x.y=V] [--workdir=DIR]
    incremental evaluate WORKDIR [--phase=P]
    incremental surgery WORKDIR (--remove-classes=3,7 | --graft=REGEX:OTHER_WORKDIR) --out=NEWDIR
    incremental learn WORKDIR --data=SOURCE --out=NEWDIR [--config.KEY=VALUE ...]
    incremental predict WORKDIR INPUT... [--top-k=3] [--format=table|json|csv]
    incremental export WORKDIR --out=DIR
    incremental sweep --config=FILE[:ARG] --sweep='KEY=[V1,V2];...' --workdir=DIR [--parallel=N]
    incremental report DIR... [--out=PREFIX]
    incremental benchmark [--models=mlp,wide_mlp,resnet32,vit_b16] [--quick] [--json=PATH]

Every user error (config, data, work directory, disk) ends with one message and exit status 2;
`--debug` anywhere on the command line shows the traceback as well. `run` parses absl flags and
calls `run.run`; re-running the same command with the same `--workdir` resumes. `evaluate`,
`surgery`, `learn`, `predict` and `export` take their own flags (argparse) and call `workdirs`,
`learn`, `predict` and `export`; `sweep` and `report` are `sweep.main` and `compare.main`.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import logging as std_logging
import os
import re
import sys
import time
import traceback

from absl import app, flags, logging
from ml_collections import config_flags
from rich.markup import escape

from incremental import report, schema
from incremental.preemption import Interruptible

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "digits.py")
COMMANDS = (
    "run", "evaluate", "surgery", "predict", "export", "learn", "sweep", "report", "benchmark"
)  # fmt: skip
WORKDIR_COMMANDS = ("evaluate", "surgery", "predict", "export", "learn")
PREEMPTED_EXIT_CODE = 3  # stopped by SIGTERM/SIGINT after saving; the same command resumes
DEBUG_FLAG = "--debug"  # anywhere on the command line: user errors show their traceback too
debug = False
RUN_FLAGS = "[--config=configs/NAME.py[:ARG]] [--config.KEY=VALUE ...] [--workdir=DIR]"
USAGE = f"""usage: incremental VERB [flags]

  run        train a class-incremental run, phase by phase (the same command resumes it)
             incremental run {RUN_FLAGS}
  evaluate   evaluate a saved phase of a work directory again, per class
             incremental evaluate WORKDIR [--phase=P]
  surgery    write an edited copy of a work directory (classes removed, parameters grafted)
             incremental surgery WORKDIR (--remove-classes=3,7 | --graft=REGEX:OTHER) --out=NEWDIR
  predict    the top classes of image files, folders of images or .npz arrays, by a saved model
             incremental predict WORKDIR INPUT... [--top-k=3] [--phase=P] [--classifier=NAME]
                                 [--format=table|json|csv]
  export     write a saved model as a file that JAX alone runs (jax.export), with its classes
             incremental export WORKDIR --out=DIR [--phase=P] [--classifier=NAME]
  learn      train new data (new classes, more examples of known ones) as a finished run's next phase
             incremental learn WORKDIR --data=SOURCE --out=NEWDIR [--config.KEY=VALUE ...]
  sweep      run a grid of runs, each in its own work directory, several at a time
             incremental sweep --config=FILE[:ARG] --sweep='KEY=[V1,V2];...' --workdir=DIR
                               [--parallel=N] [--point=K]
  report     one table (mean ± std over seeds) and figure of the finished runs under directories
             incremental report DIR... [--out=PREFIX]
  benchmark  time the train step against the machine's matmul peak
             incremental benchmark [--models=mlp,wide_mlp,resnet32,vit_b16] [--quick] [--json=PATH]

`incremental VERB --help` describes a verb's flags; --debug shows an error's traceback."""
RUN_USAGE = f"""usage: incremental run {RUN_FLAGS} [--allow_data_change]

Trains the config's method on its protocol's phases in the work directory, checkpointing every phase;
the same command with the same --workdir resumes where it stopped.

  --config=FILE[:ARG]   a config file and its argument (default configs/digits.py), e.g.
                        --config=configs/cifar100.py:method=icarl,protocol=b50_inc10
  --config.KEY=VALUE    set any key of the config, e.g. --config.train.epochs=5
  --workdir=DIR         where results.json, the plot and the checkpoints go
                        (default runs/<dataset>-<method>-<time>)
  --allow_data_change   resume although the data changed since the run stopped
  --helpfull            every flag, absl's included"""


def define_run_flags() -> None:
    """`run`'s absl flags; defining --config loads the default config file, which imports JAX,
    so the other verbs and the help never define them."""
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Config file, optionally with ':ARG'.", lock_config=True
    )
    flags.DEFINE_string(
        "workdir", None, "Work directory (default: runs/<dataset>-<method>-<time>)."
    )
    flags.DEFINE_bool(
        "allow_data_change",
        False,
        "Resume although the data differs from the saved run's (each phase records its data's "
        "fingerprint).",
    )


def default_workdir(config) -> str:
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.dataset.name.split("/")[-1])
    return os.path.join("runs", f"{dataset}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv: list[str]) -> None:
    if argv[1:] != ["run"]:
        raise app.UsageError(f"Usage: incremental {'|'.join(COMMANDS)} [--flags]; got {argv[1:]}.")
    config = flags.FLAGS.config
    try:
        schema.check(config)  # before JAX is imported: a bad value is refused in a moment
    except ValueError as error:
        fail(error)
    from incremental import run as run_lib  # imports JAX: after the cheap checks

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    workdir = flags.FLAGS.workdir or default_workdir(config)
    report.console.print(f"work directory: {workdir}")
    try:
        results = run_lib.run(config, workdir, allow_data_change=flags.FLAGS.allow_data_change)
    except (ValueError, TypeError, FloatingPointError, OSError) as error:
        fail(error)
    except run_lib.Preempted as stopped:
        command = " ".join(sys.argv)
        if not flags.FLAGS.workdir:
            command += f" --workdir={workdir}"
        report.console.print(f"{stopped} Re-run to resume: {command}", soft_wrap=True, markup=False)
        sys.exit(PREEMPTED_EXIT_CODE)
    report.print_summary(results, workdir)


def fail(error: Exception) -> None:
    """A user error: its message (and with --debug its traceback), and exit status 2."""
    if debug:
        traceback.print_exception(error)
    message = describe_os_error(error) if isinstance(error, OSError) else str(error)
    report.console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if getattr(error, "exit_at_once", False):  # checkpoint.WriteFailed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(2)


def describe_os_error(error: OSError) -> str:
    """A file the system refused to read or write (missing, no permission, disk full, ...)."""
    where = error.filename if error.filename is not None else "a file"
    return (
        f"{where}: {error.strerror or error}"
        f"{f' (errno {error.errno})' if error.errno else ''}. Check that the path exists and can "
        "be written, and that its disk has room; work saved before is unchanged, and the same "
        "command resumes a run."
    )


class _QuietThreadErrors(std_logging.Filter):
    """Drops orbax's log of an exception in its writer threads: the same exception is raised in
    the main thread, where it gets the project's message (and with --debug its traceback)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not (record.exc_info and "orbax" in record.pathname)


def check_overrides(argv: list[str], config) -> None:
    """Refuses `--config.KEY=VALUE` for a KEY that no config has, or a `method_args` key that is
    not a field of the config's method, before absl parses it (which would end in a traceback),
    naming the nearest keys."""
    for arg in argv:
        if arg.startswith("--config."):
            key, has_value, text = arg.removeprefix("--config.").partition("=")
            message = schema.check_override(key)
            field = key.removeprefix("method_args.")
            if not message and has_value:
                kind = type(config.method_args.get(field)) if key != field else None
                message = schema.check_override_value(key, text, kind)
            if not message and key.startswith("method_args.") and field not in config.method_args:
                fields = sorted(config.method_args)
                near = difflib.get_close_matches(field, fields, n=1)
                message = (
                    f"config.{key}: method {config.method!r} has no argument {field!r}"
                    f"{f' (did you mean {near[0]!r}?)' if near else ''}; its arguments: "
                    f"{', '.join(fields) or 'none'}. Choose the method in the config's argument "
                    "(--config=configs/NAME.py:method=...) so that its arguments exist."
                )
            if message:
                fail(ValueError(message))


def _quiet_closed_loops(unraisablehook):
    """`unraisablehook` but for the "Event loop is closed" that tensorstore's writes still in
    flight raise in their callbacks once orbax gave up on a failed checkpoint (reported anyway)."""

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            unraisablehook(unraisable)

    return hook


def config_first(argv: list[str]) -> list[str]:
    """`argv` with `--config=FILE` before the `--config.KEY=VALUE` overrides, which absl reads only
    once the file is loaded (it refuses them before it otherwise)."""
    files = [a for a in argv[2:] if a.startswith("--config=")]
    return argv[:2] + files + [a for a in argv[2:] if not a.startswith("--config=")]


def check_config_file(argv: list[str]):
    """The config that `--config` (or the default) gives, with a clear message for a file that is
    missing, defines no get_config, or whose get_config fails or returns no ConfigDict (absl would
    end in a traceback)."""
    for arg in argv:
        if arg.startswith("--config="):
            path, _, config_arg = arg.removeprefix("--config=").partition(":")
            if not os.path.isfile(path):
                fail(ValueError(f"config file {path} does not exist; configs are in configs/*.py."))
            with open(path) as f:
                if "def get_config" not in f.read():
                    fail(
                        ValueError(
                            f"config file {path} defines no get_config(arg=None) returning an "
                            "ml_collections.ConfigDict; see configs/digits.py for an example."
                        )
                    )
            return load_config_file(path, config_arg or None)
    return load_config_file(DEFAULT_CONFIG, None)


def load_config_file(path: str, arg: str | None):
    """Runs the file's `get_config(arg)` as absl will, turning any failure into a message."""
    import importlib.util

    import ml_collections

    where = f"--config={path}{f':{arg}' if arg else ''}"
    try:
        spec = importlib.util.spec_from_file_location("_incremental_config_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(arg) if arg is not None else module.get_config()
    except Exception as error:  # noqa: BLE001 -- any failure of the user's file gets the message
        line = getattr(error, "lineno", None)
        at = f" (line {line})" if line else ""
        fail(ValueError(f"{where} failed{at}: {type(error).__name__}: {error}"))
    if not isinstance(config, ml_collections.ConfigDict):
        fail(
            ValueError(
                f"{where}: get_config returned {type(config).__name__}, not an "
                "ml_collections.ConfigDict; see configs/digits.py for an example."
            )
        )
    return config


def workdir_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="incremental")
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("evaluate", help="evaluate a saved phase of a work directory")
    evaluate.add_argument("workdir")
    evaluate.add_argument("--phase", type=int, help="the phase to evaluate (default: the newest)")
    edit = commands.add_parser("surgery", help="write an edited copy of a work directory")
    edit.add_argument("workdir")
    edit.add_argument("--out", required=True, help="the new work directory (must not exist)")
    what = edit.add_mutually_exclusive_group(required=True)
    what.add_argument("--remove-classes", metavar="IDS", help="class ids to remove, e.g. 3,7")
    what.add_argument("--graft", metavar="REGEX:OTHER_WORKDIR", help="params to copy from a run")
    add_predict_parser(commands)
    add_export_parser(commands)
    add_learn_parser(commands)
    return parser


def add_learn_parser(commands) -> None:
    verb = commands.add_parser(
        "learn",
        help="train new data as a finished run's next phase",
        epilog="--config.KEY=VALUE (repeatable) changes a training key for the new phase, e.g. "
        "--config.train.epochs=5; the data, protocol, method and model stay the run's.",
    )
    verb.add_argument("workdir")
    verb.add_argument("--data", required=True, help="the new data: npz:PATH, folder:PATH, ...")
    verb.add_argument(
        "--out",
        required=True,
        help="the new work directory (must not exist; the same learn resumes)",
    )


def parse_workdir_args(argv: list[str]) -> argparse.Namespace:
    """The verb's arguments; `learn` also takes `--config.KEY=VALUE` overrides (`args.overrides`)."""
    parser = workdir_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = {}
    for arg in extra:
        key, sep, value = arg.removeprefix("--config.").partition("=")
        if args.command != "learn" or not arg.startswith("--config.") or not sep or not key:
            parser.error(f"unrecognized argument {arg!r} (overrides are --config.KEY=VALUE)")
        overrides[key] = value
    args.overrides = overrides
    return args


def add_predict_parser(commands) -> None:
    verb = commands.add_parser("predict", help="the top classes of inputs, by a saved model")
    verb.add_argument("workdir")
    verb.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, .npz")
    verb.add_argument("--top-k", type=int, default=3, help="classes per input (default 3)")
    verb.add_argument("--phase", type=int, help="the phase whose model predicts (default: newest)")
    verb.add_argument(
        "--classifier", help="'head' (default: the one reported as accuracy) or e.g. 'nme'"
    )
    verb.add_argument("--format", choices=("table", "json", "csv"), default="table")


def add_export_parser(commands) -> None:
    verb = commands.add_parser("export", help="write a saved model as a jax.export artifact")
    verb.add_argument("workdir")
    verb.add_argument("--out", required=True, help="the artifact's directory (new or empty)")
    verb.add_argument(
        "--phase", type=int, help="export this phase (default: the last, which must exist)"
    )
    verb.add_argument(
        "--classifier", help="'head' (default: the one reported as accuracy) or e.g. 'nme'"
    )


def class_ids(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(
            f"--remove-classes={text!r} is not a comma-separated list of ids."
        ) from None


def workdir_command(argv: list[str]) -> None:
    """`incremental evaluate|surgery ...`: bad input exits with code 2 and the message, as `run`."""
    args = parse_workdir_args(argv)
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    flags.FLAGS.mark_as_parsed()  # absl flags are not used here; libraries may read their defaults
    try:
        with Interruptible(lambda line: report.console.print(line, markup=False)):
            workdir_verb(args)
    except (ValueError, TypeError, OSError) as error:
        fail(error)


def workdir_verb(args: argparse.Namespace) -> None:
    """Runs `evaluate`, `surgery`, `predict` or `export` and prints what it did."""
    from incremental import workdirs

    if args.command == "predict":
        predict_verb(args)
        return
    if args.command == "export":
        export_verb(args)
        return
    if args.command == "learn":
        learn_verb(args)
        return
    if args.command == "evaluate":
        doc = workdirs.evaluate(args.workdir, args.phase)
        report.console.print(workdirs.evaluation_table(doc))
        return
    if args.remove_classes is not None:
        record = workdirs.remove_classes(args.workdir, class_ids(args.remove_classes), args.out)
        done = f"removed classes {record['classes']}; new class ids {record['class_ids']}"
    else:
        pattern, sep, other = args.graft.rpartition(":")
        if not sep or not pattern or not other:
            raise ValueError(f"--graft={args.graft!r} is not REGEX:OTHER_WORKDIR.")
        record = workdirs.graft(args.workdir, pattern, other, args.out)
        done = f"grafted {len(record['paths'])} arrays from {other}"
    report.console.print(f"{args.out}: {done}", soft_wrap=True, markup=False)
    report.console.print(workdirs.evaluation_table(workdirs.evaluate(args.out)))
    say_how_to_resume(args.out)


def say_how_to_resume(workdir: str) -> None:
    """The command that resumes or extends a work directory that surgery or learn wrote."""
    from incremental import workdirs

    config = os.path.join(workdir, workdirs.CONFIG_FILE)
    report.console.print(
        f"Resume or extend it: incremental run --config={config} --workdir={workdir}",
        soft_wrap=True,
        markup=False,
    )


def learn_verb(args: argparse.Namespace) -> None:
    """`incremental learn`: the new phase's line as it trains, then the run's summary."""
    from incremental import learn
    from incremental.preemption import Preempted

    try:
        results = learn.learn(args.workdir, args.data, args.out, args.overrides)
    except Preempted as stopped:
        command = " ".join(["incremental", *sys.argv[1:]])
        report.console.print(f"{stopped} Re-run to resume: {command}", soft_wrap=True, markup=False)
        sys.exit(PREEMPTED_EXIT_CODE)
    report.print_summary(results, args.out)
    say_how_to_resume(args.out)


def predict_verb(args: argparse.Namespace) -> None:
    """`incremental predict`: a table, or JSON or CSV on stdout."""
    from incremental import predict

    predictions = predict.predict(
        args.workdir,
        args.inputs,
        top_k=args.top_k,
        phase=args.phase,
        classifier=args.classifier,
    )
    if args.format == "json":
        print(json.dumps(predictions, indent=1))
    elif args.format == "csv":
        rows = predict.rows(predictions)
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        first = predictions[0]
        title = (
            f"{args.workdir}, phase {first['phase']}, classifier {first['classifier']}: "
            f"top {args.top_k} classes ({first['kind']})"
        )
        report.console.print(predict.prediction_table(predictions, title))


def export_verb(args: argparse.Namespace) -> None:
    from incremental import export

    doc = export.export(args.workdir, args.out, phase=args.phase, classifier=args.classifier)
    output = doc["output"]
    report.console.print(
        f"{args.out}: phase {doc['source']['phase']} of {args.workdir}, input "
        f"{doc['input']['dtype']} {doc['input']['shape']}, output {output['kind']} of "
        f"{output['shape'][1]} classes ({output['classifier']}); files {export.ARTIFACT_FILE}, "
        f"{export.CLASSES_FILE}, {export.PREPROCESSING_FILE}",
        soft_wrap=True,
        markup=False,
    )


def entry_point() -> None:
    global debug
    debug = DEBUG_FLAG in sys.argv
    sys.argv = [a for a in sys.argv if a != DEBUG_FLAG]
    if not debug:
        logging.get_absl_logger().addFilter(_QuietThreadErrors())
        sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
    try:
        dispatch()
    except KeyboardInterrupt:  # Ctrl-C outside the handlers (while starting, or in benchmark)
        print("SIGINT: stopped.", file=sys.stderr)
        sys.exit(130)


def dispatch() -> None:
    """Runs the verb that `sys.argv` names."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}.\n\n{USAGE}")
        sys.exit(2)
    if args[0] == "run" and ({"-h", "--help"} & set(args)):
        print(RUN_USAGE)
        return
    if sys.argv[1:2] == ["benchmark"]:
        from incremental import bench

        try:
            bench.main(sys.argv[2:])
        except ValueError as error:
            sys.exit(f"error: {error}")
        return
    if args[0] in ("sweep", "report"):
        from incremental import compare, sweep

        try:
            if args[0] == "sweep":
                code = sweep.main(args[1:], report.console.print, report.console)
            else:
                code = compare.main(args[1:], report.console.print)
        except (ValueError, OSError) as error:
            fail(error)
        sys.exit(code)
    if sys.argv[1:2] and sys.argv[1] in WORKDIR_COMMANDS:
        workdir_command(sys.argv[1:])
        return
    sys.argv = config_first(sys.argv)
    check_overrides(sys.argv, check_config_file(sys.argv))
    define_run_flags()
    app.run(main)


if __name__ == "__main__":
    entry_point()

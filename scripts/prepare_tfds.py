"""Downloads a TFDS dataset and writes it in array_record format for `load_source("tfds:NAME")`.

Preparing needs TensorFlow, which training does not:

  pip install -e '.[prepare]' && python scripts/prepare_tfds.py cifar100 [--data_dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

PREPARE_HINT = "pip install -e '.[prepare]'"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="TFDS dataset name, e.g. mnist or cifar100.")
    parser.add_argument(
        "--data_dir", default=None, help="TFDS data directory (default: the TFDS default)."
    )
    return parser.parse_args(argv)


def prepare(name: str, data_dir: str | None = None) -> str:
    """Downloads and prepares `name` as array_record files.

    Args:
      name: TFDS dataset name, optionally with config and version (e.g. "mnist:3.0.1").
      data_dir: TFDS data directory; None uses the TFDS default.

    Returns:
      The directory the prepared dataset was written to.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    # download_and_prepare silently reuses a dataset already prepared in another format.
    if tfds.core.FileFormat.ARRAY_RECORD not in builder.info.available_file_formats():
        raise ValueError(
            f"{builder.data_dir} already holds {name} as {builder.info.file_format}, which "
            f"cannot be read by index. Delete that folder or pass another --data_dir."
        )
    return str(builder.data_dir)


def _command(name: str, data_dir: str | None) -> str:
    """The command line that prepares `name` into `data_dir`."""
    dir_flag = f" --data_dir {data_dir}" if data_dir else ""
    return f"{PREPARE_HINT} && python scripts/prepare_tfds.py {name}{dir_flag}"


def main(argv: list[str] | None = None) -> int:
    """Prepares the dataset named on the command line; returns the exit status."""
    args = parse_args(argv)
    if importlib.util.find_spec("tensorflow") is None:
        print(
            "Preparing TFDS datasets needs TensorFlow, which is not installed. Run:\n"
            f"  {_command(args.name, args.data_dir)}",
            file=sys.stderr,
        )
        return 1
    data_dir = prepare(args.name, args.data_dir)
    print(f"Prepared {args.name} in {data_dir}; load it with load_source('tfds:{args.name}').")
    return 0


if __name__ == "__main__":
    sys.exit(main())

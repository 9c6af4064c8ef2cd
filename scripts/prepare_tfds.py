"""Downloads a TFDS dataset and writes it in array_record format for `load_source("tfds:NAME")`.

Preparing needs TensorFlow, which training does not, and the network:

  pip install -e '.[prepare]' && python scripts/prepare_tfds.py cifar100 [--data_dir DIR]

Before downloading, the dataset's download hosts are tried (a few seconds at most): without the
network the script says so at once instead of retrying for minutes. Every failure is one message
and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys
import urllib.parse

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
    hosts = unreachable(builder.url_infos or {})
    if hosts:
        raise ValueError(
            f"Preparing {name} downloads from {', '.join(sorted(hosts))}, which cannot be "
            f"reached from here ({'; '.join(hosts.values())}). Prepare it on a machine with the "
            f"network and copy its folder into {builder.data_dir.rsplit('/', 2)[0]} here, or "
            "use a built-in dataset (digits, mnist1d) or your own (npz:PATH)."
        )
    try:
        builder.download_and_prepare(file_format="array_record")
    except OSError as error:  # requests' network errors are OSErrors too
        raise ValueError(f"Preparing {name} failed: {type(error).__name__}: {error}") from None
    # download_and_prepare silently reuses a dataset already prepared in another format.
    if tfds.core.FileFormat.ARRAY_RECORD not in builder.info.available_file_formats():
        raise ValueError(
            f"{builder.data_dir} already holds {name} as {builder.info.file_format}, which "
            f"cannot be read by index. Delete that folder or pass another --data_dir."
        )
    return str(builder.data_dir)


def unreachable(urls, timeout: float = 5.0) -> dict[str, str]:
    """The hosts of `urls` that no connection reaches within `timeout` seconds, with the reason."""
    failed = {}
    for host in sorted({urllib.parse.urlsplit(url).hostname for url in urls} - {None}):
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError as error:
            failed[host] = f"{host}: {error.strerror or error}"
    return failed


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
        return 2
    try:
        data_dir = prepare(args.name, args.data_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Prepared {args.name} in {data_dir}; load it with load_source('tfds:{args.name}').")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the train epoch and evaluation; see `incremental/bench.py` (`--help` for flags)."""

from incremental.bench import main

if __name__ == "__main__":
    main()

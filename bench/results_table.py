"""Recompute the results table from the committed row records (not a benchmark of speed):
every ``docs/results/*.json`` is read and validated with the one reader
(:class:`dpfl.shared.eval.record.ResultRecord`) and printed as Markdown, with our CNN's
accuracy and, for rows run with ``--classifiers all``, DPImageBench's 3-classifier mean and
its ResNet / WideResNet / ResNeXt members. Usage::

    python bench/results_table.py [FOLDER]      # default docs/results
"""

from __future__ import annotations

import argparse

from dpfl.shared.eval.record import read_records, records_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default="docs/results")
    print(records_table(read_records(ap.parse_args().folder)), end="")


if __name__ == "__main__":
    main()

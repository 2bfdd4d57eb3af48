"""The ``bitro`` command line: batch jobs that mirror the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bitro._logging import logger


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitro", description="Gene expression from H&E images (BiTro).")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline on the built-in synthetic tissue")
    demo.add_argument("--out", default="bitro_demo", help="output folder (created; never overwritten)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=int, default=1600, help="synthetic slide size in pixels")
    demo.add_argument("--slides", type=int, default=3, help="number of synthetic slides")
    demo.add_argument("--epochs", type=int, default=30)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bitro`` command."""
    args = _build_parser().parse_args(argv)
    from bitro import settings

    settings.verbosity = min(3, 1 + args.verbose) if args.verbose else 2
    logging.captureWarnings(True)
    if args.command == "demo":
        from bitro._demo import run_demo

        report = run_demo(
            out=args.out, seed=args.seed, size=args.size, n_slides=args.slides, epochs=args.epochs
        )
        logger.info("Report written to %s", report)
        sys.stdout.write(f"{report}\n")
        return 0
    return 1  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``bitro`` command line: batch jobs that mirror the Python API.

``bitro preprocess`` → ``bitro fit`` → ``bitro predict`` → ``bitro evaluate`` (and ``bitro transfer``,
``bitro demo``). Importing this module is cheap: the work lives in :mod:`bitro._cli_commands` and
is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

from bitro import _keys as K
from bitro._logging import logger
from bitro._version import __version__

READERS = ("st", "hest", "visium", "wsi", "zarr")
MODELS = ("bitro", "ridge", "mlp", "depth", "cell_count", "mean")
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, KeyError, ValueError)


def _common() -> argparse.ArgumentParser:
    """Options every sub-command accepts (so ``bitro fit ... -v`` works as well as ``bitro -v fit``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more logging (-v info, -vv debug with tracebacks)",
    )
    return parent


def _training(p: argparse.ArgumentParser, *, epochs: int, lr: float) -> None:
    p.add_argument("--level", choices=("spot", "bulk"), default="spot", help="training level (default: spot)")
    p.add_argument("--genes", metavar="FILE", help="genes to predict: .txt (one per line) or .npy")
    p.add_argument("--epochs", type=int, default=epochs, help=f"maximum epochs (default: {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default: {lr:g})")
    p.add_argument("--batch-size", type=int, default=32, help="bags per batch (default: 32)")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs (default: 6)")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="held-out bags (default: 0.1)")
    p.add_argument("--cluster-weight", type=float, default=None, help="λ of the cluster loss")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: bt.settings.seed)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _add_preprocess(sub, parent) -> None:
    p = sub.add_parser(
        "preprocess",
        parents=[parent],
        help="read a slide, normalise stains, segment and embed cells, write a zarr",
        description=(
            "normalize_stains → detect_tissue → segment_cells → embed_cells → assign_cells (slides with "
            "spots) or make_patches (slides without). With --cohort, several inputs go into the --out "
            "folder as <name>.zarr; existing outputs are skipped, failing slides are reported at the end."
        ),
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="slide, folder or zarr store (several with --cohort)"
    )
    p.add_argument("--out", required=True, help="output .zarr (a folder with --cohort)")
    p.add_argument("--cohort", action="store_true", help="process several slides into the --out folder")
    p.add_argument(
        "--reader", choices=READERS, default=None, help="input format (default: guessed from INPUT)"
    )
    p.add_argument("--counts", help="st: counts file (relative to INPUT when INPUT is a folder)")
    p.add_argument("--spots", help="st: spot coordinates file")
    p.add_argument("--image", help="st/visium: H&E image file")
    p.add_argument(
        "--sample-id", action="append", help="slide name (hest: sample id; repeat it with --cohort)"
    )
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel (st/wsi; default: from the data)")
    p.add_argument("--bulk", metavar="CSV", help="wsi: gene → TPM table of the slide's bulk RNA profile")
    p.add_argument(
        "--stain",
        choices=("macenko", "vahadane", "reinhard", "none"),
        default=K.STAIN_METHOD,
        help=f"stain normalisation method, or 'none' (default: {K.STAIN_METHOD}, the benchmarks' method)",
    )
    p.add_argument(
        "--segment", default="watershed", help="segmentation method, or 'none' to keep the input's cells"
    )
    p.add_argument(
        "--encoder",
        default="efficientnet_lite0",
        help="cell encoder: efficientnet_lite0, morphology, or a local checkpoint path (see bt.pp.list_encoders)",
    )
    p.add_argument("--mode", choices=("tile", "crop"), default="tile", help="embedding mode (default: tile)")
    bags = p.add_mutually_exclusive_group()
    bags.add_argument(
        "--assign", dest="bags", action="store_const", const="assign", help="assign cells to spots"
    )
    bags.add_argument(
        "--patches", dest="bags", action="store_const", const="patches", help="tile the tissue into patches"
    )
    p.add_argument("--patch-um", type=float, default=None, help="patch side in µm (default: spot-sized)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs and elements")
    p.add_argument(
        "--scratch-dir",
        metavar="DIR",
        default=None,
        help=(
            "folder for per-tile segmentation and embedding results (DIR/<name>/segment, DIR/<name>/embed), "
            "so an interrupted run resumes mid-slide; deleted per slide once its output is written"
        ),
    )


def _add_fit(sub, parent) -> None:
    p = sub.add_parser(
        "fit", parents=[parent], help="train a model on preprocessed slides and save it (bt.tl.fit)"
    )
    p.add_argument("train", nargs="+", metavar="TRAIN.zarr", help="training slides")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--model", choices=MODELS, default="bitro", help="model (only bitro can be saved)")
    p.add_argument("--target", choices=("raw", "library_size"), default="raw", help="target scale")
    p.add_argument("--use-rep", default="X_bitro", help="cell embedding in cells.obsm")
    p.add_argument("--config", metavar="JSON", help="BiTroConfig fields: a JSON object or a .json file")
    p.add_argument("--n-components", type=int, default=128, help="PCA dimension of the cell features")
    p.add_argument("--n-phenotypes", type=int, default=8, help="k-means phenotypes")
    _training(p, epochs=100, lr=1e-4)


def _add_transfer(sub, parent) -> None:
    p = sub.add_parser(
        "transfer", parents=[parent], help="fine-tune a saved model on another level (bt.tl.transfer)"
    )
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("data", nargs="+", metavar="DATA.zarr", help="slides of the target level")
    p.add_argument("--out", required=True, metavar="MODEL_DIR2", help="folder of the new model")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA scaling")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--target", choices=("raw", "library_size"), default=None, help="default: the source's")
    _training(p, epochs=50, lr=1e-3)


def _add_predict(sub, parent) -> None:
    p = sub.add_parser("predict", parents=[parent], help="predict expression of a slide with a saved model")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("data", metavar="DATA.zarr")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="OUT.zarr", help="write a new zarr store")
    where.add_argument("--inplace", action="store_true", help="update the tables of DATA.zarr")
    p.add_argument("--key-added", default="bitro", help="layer / uns key of the predictions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace --out and existing prediction keys")


def _add_evaluate(sub, parent) -> None:
    p = sub.add_parser("evaluate", parents=[parent], help="score predictions against observed counts")
    p.add_argument("data", metavar="DATA.zarr")
    p.add_argument("--layer", default="bitro", help="layer with the predictions (default: bitro)")
    p.add_argument("--table", default="spots", help="table to score: spots, patches or bulk")
    p.add_argument("--truth-layer", default="counts", help="layer of observed counts ('X' for .X)")
    p.add_argument("--normalize", choices=("raw", "library_size", "both"), default="both")
    p.add_argument("--out", metavar="CSV", help="write the metrics as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitro", description="Gene expression from H&E images (BiTro).")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    parser.add_argument("--version", action="version", version=f"bitro {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parent = _common()
    _add_preprocess(sub, parent)
    _add_fit(sub, parent)
    _add_predict(sub, parent)
    _add_evaluate(sub, parent)
    _add_transfer(sub, parent)
    demo = sub.add_parser("demo", parents=[parent], help="run the pipeline on the built-in synthetic tissue")
    demo.add_argument("--out", default="bitro_demo", help="output folder (created; never overwritten)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=int, default=1600, help="synthetic slide size in pixels")
    demo.add_argument("--slides", type=int, default=3, help="number of synthetic slides")
    demo.add_argument("--epochs", type=int, default=30)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from bitro._demo import run_demo

    report = run_demo(out=args.out, seed=args.seed, size=args.size, n_slides=args.slides, epochs=args.epochs)
    logger.info("Report written to %s", report)
    sys.stdout.write(f"{report}\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _demo(args)
    from bitro._cli_commands import COMMANDS

    return COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bitro`` command.

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    Exit code: 0 on success, 2 for usage and user errors (``error: <message>`` on stderr, no
    traceback), 1 when some slides of a ``preprocess --cohort`` run failed.
    """
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    from bitro import settings

    old_verbosity = settings.verbosity
    settings.verbosity = min(3, 1 + args.verbose) if args.verbose else 2
    logging.captureWarnings(True)
    chatty = logging.getLogger("ome_zarr")  # logs "no parent found ..." for every labels element read
    old_chatty = chatty.level
    try:
        with warnings.catch_warnings():
            if settings.verbosity < 3:
                warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)
                chatty.setLevel(logging.ERROR)
            return _run(args)
    except USER_ERRORS as err:
        from bitro._cli_commands import _message

        logger.debug("%s failed", args.command, exc_info=True)
        sys.stderr.write(f"error: {_message(err)}\n")
        return 2
    finally:
        logging.captureWarnings(False)
        chatty.setLevel(old_chatty)
        settings.verbosity = old_verbosity


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

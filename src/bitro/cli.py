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
from bitro.io._read import list_readers

MODELS = ("bitro", "ridge", "mlp", "depth", "cell_count", "mean")
#: SetupConfig fields a transfer may change (the rest are the source model's).
TRANSFER_SETUP = ("target", "zscore", "cluster_weight", "seed")
USER_ERRORS = (
    OSError,
    KeyError,
    ValueError,
)  # OSError covers missing, existing, unwritable paths, full disks


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


def _option_type(annotation: str):
    """The argparse ``type`` of a config field annotated ``int``, ``float``, ``str``, optionally ``| None``."""
    base = {"int": int, "float": float, "str": str}[annotation.replace(" | None", "").strip()]
    if "None" not in annotation:
        return base

    def parse(text: str):
        return None if text.lower() == "none" else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def _config_options(p: argparse.ArgumentParser, cls: type, *, only: Sequence[str] | None = None,
                    title: str, shown: dict[str, str] | None = None) -> None:  # fmt: skip
    """One option per field of the config dataclass ``cls`` (``--max-epochs`` for ``max_epochs``, ...).

    Help and default come from the dataclass, which is where the Python API takes them from too; an
    option the user does not give is not passed on, so the dataclass default applies.
    """
    from dataclasses import MISSING, fields

    group = p.add_argument_group(title)
    for f in fields(cls):
        if (only is not None and f.name not in only) or f.metadata.get("cli") is False:
            continue
        flags = [f"--{f.name.replace('_', '-')}"]
        if f.name == "max_epochs":
            flags.append("--epochs")
        default = None if f.default is MISSING else f.default
        text = (shown or {}).get(f.name, f.metadata.get("shown", default))
        kw = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata['help']} (default: {text})",
        }
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _option_type(str(f.type))
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            kw["metavar"] = f.name.upper() if "choices" not in f.metadata else None
        group.add_argument(*flags, **kw)


def _training(p: argparse.ArgumentParser, *, setup_fields: Sequence[str] | None = None) -> None:
    from bitro.tl._configs import SetupConfig, TrainConfig

    p.add_argument("--level", choices=("spot", "bulk"), default="spot", help="training level (default: spot)")
    p.add_argument("--genes", metavar="FILE", help="genes to predict: .txt (one per line) or .npy (default: "
                   "highly variable genes of the training spots, or the source model's genes for transfer)")  # fmt: skip
    source = (
        None if setup_fields is None else dict.fromkeys(("target", "zscore", "seed"), "the source model's")
    )
    _config_options(
        p, SetupConfig, only=setup_fields, title="data and targets (bt.tl.SetupConfig)", shown=source
    )
    _config_options(p, TrainConfig, title="training (bt.tl.TrainConfig)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda", "mps"),
        default=None,
        help="compute device (default: bt.settings.device, i.e. auto: CUDA, then MPS, then CPU)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out model folder written by bitro"
    )


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
        "--reader",
        choices=list_readers(),
        default=None,
        help="input format (default: guessed from INPUT; readers are registered with bt.io.register_reader)",
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
        "--segment",
        default="watershed",
        help="segmentation method (see bt.pp.list_segmenters), or 'none' to keep the input's cells "
        "(default: watershed)",
    )
    p.add_argument(
        "--encoder",
        default="efficientnet_lite0",
        help="cell encoder: efficientnet_lite0, morphology, or a local checkpoint path (see bt.pp.list_encoders; "
        "default: efficientnet_lite0)",
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
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda", "mps"),
        default="auto",
        help="device of the embedding (default: auto: CUDA, then MPS, then CPU)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="random seed of the preprocessing (default: bt.settings.seed)"
    )
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
        "fit",
        parents=[parent],
        help="train a model on preprocessed slides and save it (bt.tl.fit)",
        description="Defaults are the settings the accuracy benchmark found best (docs/benchmarks.md).",
    )
    p.add_argument("train", nargs="+", metavar="TRAIN.zarr", help="training slides (zarr stores)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument(
        "--model", choices=MODELS, default="bitro", help="model (default: bitro; only bitro can be saved)"
    )
    p.add_argument("--config", metavar="JSON", help="network options (bt.models.BiTroConfig fields): a JSON "
                   "object or a .json file (default: BiTroConfig defaults)")  # fmt: skip
    p.add_argument(
        "--n-models", type=_positive_int, default=1,
        help="fit this many models (seeds SEED, SEED+1, ...) and save them as one ensemble whose predictions "
        "are their average (3: +0.014 normalised PCC_gene on HER2ST for 3x the training; default: 1)",
    )  # fmt: skip
    _training(p)


def _add_transfer(sub, parent) -> None:
    p = sub.add_parser(
        "transfer", parents=[parent], help="fine-tune a saved model on another level (bt.tl.transfer)"
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="saved source model (bitro fit --out)")
    p.add_argument("data", nargs="+", metavar="DATA.zarr", help="slides of the target level")
    p.add_argument("--out", required=True, metavar="MODEL_DIR2", help="folder of the new model")
    p.add_argument(
        "--method", choices=("lora", "full"), default="lora",
        help="lora: adapters on a frozen base, gene head trained; full: every weight (default: lora)",
    )  # fmt: skip
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA scaling alpha (default: 16)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    _training(p, setup_fields=TRANSFER_SETUP)


def _add_predict(sub, parent) -> None:
    p = sub.add_parser("predict", parents=[parent], help="predict expression of a slide with a saved model")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="saved model folder (bitro fit --out)")
    p.add_argument("data", metavar="DATA.zarr", help="preprocessed slide (bitro preprocess --out)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="OUT.zarr", help="write a new zarr store")
    where.add_argument("--inplace", action="store_true", help="update the tables of DATA.zarr")
    p.add_argument("--key-added", default="bitro", help="layer / uns key of the predictions (default: bitro)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="bags per forward pass (default: 64)")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda", "mps"), default=None,
        help="compute device (default: bt.settings.device, i.e. auto)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace --out and existing prediction keys")


def _add_evaluate(sub, parent) -> None:
    p = sub.add_parser("evaluate", parents=[parent], help="score predictions against observed counts")
    p.add_argument("data", metavar="DATA.zarr", help="slide with predictions (bitro predict --out)")
    p.add_argument("--layer", default="bitro", help="layer with the predictions (default: bitro)")
    p.add_argument("--table", default="spots", help="table to score: spots, patches or bulk (default: spots)")
    p.add_argument(
        "--truth-layer", default="counts", help="layer of observed counts, 'X' for .X (default: counts)"
    )
    p.add_argument(
        "--normalize", choices=("raw", "library_size", "both"), default="both",
        help="target scale(s) to score on: raw log1p, library-size normalised log1p, or both (default: both)",
    )  # fmt: skip
    p.add_argument("--out", metavar="CSV", help="write the metrics as CSV (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out CSV written by bitro")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be a positive integer, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


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
    _add_demo(sub, parent)
    return parser


def _add_demo(sub, parent) -> None:
    demo = sub.add_parser(
        "demo",
        parents=[parent],
        help="run the pipeline on the built-in synthetic tissue",
        description=(
            "Synthetic slides → stain normalisation → segmentation → embedding → fit bitro and baselines on all "
            "but the last slide → predict and score the last. Writes report.md (headline: bitro vs ridge), "
            "report.json, metrics.csv and figures. Every run gets a fresh folder unless --out is given."
        ),
    )
    demo.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder, absent or empty (default: a fresh bitro_demo/<YYYYmmdd-HHMMSS>)",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="let --out hold an earlier demo's output and replace it (other files are never removed)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="random seed of the tissue and the models (default: 0)"
    )
    demo.add_argument("--size", type=int, default=1600, help="synthetic slide size in pixels (default: 1600)")
    demo.add_argument(
        "--slides", type=int, default=3, help="number of synthetic slides, the last one held out (default: 3)"
    )
    demo.add_argument("--epochs", type=int, default=30, help="maximum training epochs of bitro (default: 30)")


def _demo(args: argparse.Namespace) -> int:
    from bitro._demo import run_demo

    report = run_demo(
        out=args.out,
        overwrite=args.overwrite,
        seed=args.seed,
        size=args.size,
        n_slides=args.slides,
        epochs=args.epochs,
    )
    logger.info("Report written to %s", report)
    sys.stdout.write(f"{report}\n")
    return 0


def _message(err: BaseException) -> str:
    """The user-facing text of an exception (``KeyError`` quotes its message; undo that)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err) or type(err).__name__


def _exists(path: str, what: str) -> None:
    from pathlib import Path

    if not Path(path).exists():
        msg = f"{what} {path!r} not found."
        raise FileNotFoundError(msg)


def _model_folder(path: str) -> None:
    from pathlib import Path

    folder = Path(path)
    is_model = (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    if not is_model and not (folder / "ensemble.json").is_file():
        what = (
            "not found"
            if not folder.exists()
            else "is not a bitro model folder (config.json + model.safetensors) nor an ensemble folder (ensemble.json)"
        )
        msg = f"MODEL_DIR {path!r} {what}; give a folder written by `bitro fit --out` or model.save()."
        raise FileNotFoundError(msg)


def _preflight(args: argparse.Namespace) -> None:
    """Check the paths a command reads before the heavy imports (a typo fails in milliseconds)."""
    if getattr(args, "model_dir", None) is not None:
        _model_folder(args.model_dir)
    for path in getattr(args, "inputs", None) or []:
        _exists(path, "input")
    for path in getattr(args, "train", None) or []:
        _exists(path, "training slide")
    data = getattr(args, "data", None)
    for path in [data] if isinstance(data, str) else data or []:
        _exists(path, "slide")
    if getattr(args, "genes", None) is not None:
        _exists(args.genes, "--genes file")
    config = getattr(args, "config", None)
    if config is not None and not config.lstrip().startswith("{"):
        _exists(config, "--config file")


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _demo(args)
    _preflight(args)
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
        logger.debug("%s failed", args.command, exc_info=True)
        sys.stderr.write(f"error: {_message(err)}\n")
        return 2
    finally:
        logging.captureWarnings(False)
        chatty.setLevel(old_chatty)
        settings.verbosity = old_verbosity


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

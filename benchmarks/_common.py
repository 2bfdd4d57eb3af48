"""Shared helpers of the benchmark harness: provenance, timing and memory, result files, section cache.

Nothing here asserts a speed; it only measures and records. Results are JSON files in
``benchmarks/results/`` (one per benchmark), each carrying the machine, versions, git commit and
wall time of the run; :mod:`benchmarks.report` turns them into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
CACHE_DIR = ROOT / "benchmarks" / "cache"
DATA_DIR = Path(os.environ.get("BITRO_DATA_DIR", ROOT.parent / "shared" / "data"))
SECTIONS = ("C2", "C3", "C4", "C5", "C6")
SEED = 0
# half-size (px) of the central window of each section used by the standard accuracy/bulk runs;
# None = whole sections (the default; ``python -m benchmarks --window 2000`` when CPU time is short)
# ``epochs`` overrides the bitro max_epochs and ``ablation_folds`` the held-out folds of the ablations
# (``--epochs``, ``--ablation-folds``); every result records what was used.
# ``groups`` limits the accuracy benchmark to "main" or "ablation" runs (two processes can share the work;
# the ablation-only result is written as ``accuracy_ablations`` and merged into the page).
SETTINGS: dict[str, Any] = {
    "window": None,
    "epochs": None,
    "ablation_folds": None,
    "groups": None,
    "full": False,
}

# preprocessing of the real sections: bitro's prepared-section recipe (bt.datasets.her2st(..., prepared=True)),
# with the benchmarks' own cache folder; windows (``--window``) keep spots whose centre is inside, as before
PREPARATION_KW: dict[str, Any] = {"keep": "centre"}
PREPROCESS = {
    "stain_method": "macenko",
    "tissue": "otsu (bt.pp.detect_tissue defaults)",
    "segmentation": "watershed (bt.pp.segment_cells defaults, on the normalised image, inside the tissue)",
    "tile_size": 1024,
    "crop_um": 33.0,
    "context_um": [200.0],
    "recipe": "bitro.datasets._prepared.Preparation (the cache key records every field)",
}


def is_default_network(config: dict[str, Any] | None) -> bool:
    """Whether every field ``config`` sets equals bitro's default network (``BiTroConfig``)."""
    from bitro.models import BiTroConfig

    net = BiTroConfig(n_genes=1)
    return all(getattr(net, k) == v for k, v in (config or {}).items())


def features_label(context_um: Any = None) -> str:
    """How the cached cells are described: EfficientNet-Lite0 tile features (+ their context windows)."""
    ctx = PREPROCESS["context_um"] if context_um is None else context_um
    if not ctx:
        return "EfficientNet-Lite0 tile features"
    return f"EfficientNet-Lite0 tile features of each nucleus + its {' and '.join(f'{c:g}' for c in ctx)} µm neighbourhood"


# --------------------------------------------------------------------------- provenance
def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM and the load average at call time."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        ram_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str]:
    """Versions of Python and the main libraries."""
    out = {"python": platform.python_version()}
    for name in ("bitro", "numpy", "torch", "spatialdata", "anndata", "sklearn", "torch_geometric"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            out[name] = "not installed"
    return out


def git_commit() -> dict[str, Any]:
    """Current commit and whether the work tree has uncommitted changes (read-only git calls).

    The harness's own outputs (``benchmarks/results/``, the page) do not count as changes: a run
    rewrites them as it goes.
    """

    def _git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return res.stdout.strip()

    outputs = (":(exclude)benchmarks/results", ":(exclude)docs/benchmarks.md")
    dirty = bool(_git("status", "--porcelain", "--", ".", *outputs))
    return {"commit": _git("rev-parse", "HEAD") or "unknown", "dirty": dirty}


# --------------------------------------------------------------------------- time and memory
def _rss_mb() -> float:
    """Current resident set size of this process in MB (Linux ``/proc``; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def max_rss_mb() -> float:
    """Peak RSS of this process so far in MB (``getrusage``; kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Steps:
    """Per-step wall time and peak RSS; a sampling thread tracks RSS while a step runs.

    ``with steps("segment"): ...`` records ``{"seconds", "peak_rss_mb", "start_rss_mb"}`` under
    ``steps.records["segment"]`` (plus ``cpu_seconds``: user + system CPU time of the process, all
    threads, which is less sensitive than wall time to other jobs on a shared machine). The sampler polls ``/proc/self/statm`` every ``interval`` seconds,
    so very short spikes can be missed; the process-wide ``ru_maxrss`` is recorded as well.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.records: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, float]]:
        rec: dict[str, float] = {"start_rss_mb": round(_rss_mb(), 1)}
        peak = [rec["start_rss_mb"]]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval):
                peak[0] = max(peak[0], _rss_mb())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield rec
        finally:
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            rec["cpu_seconds"] = round(time.process_time() - c0, 2)
            stop.set()
            thread.join()
            rec["peak_rss_mb"] = round(max(peak[0], _rss_mb()), 1)
            self.records[name] = rec

    def total_seconds(self) -> float:
        return round(sum(r["seconds"] for r in self.records.values()), 2)


def run_worker(module: str, *args: str, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m <module> <args>`` in a fresh process; it prints one JSON object as its last line.

    Used where a clean peak RSS is needed (each worker reports its own ``ru_maxrss``).
    """
    cmd = [sys.executable, "-m", module, *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        return {"error": f"exit {res.returncode}", "stderr_tail": res.stderr[-2000:]}
    last = [ln for ln in res.stdout.splitlines() if ln.strip()][-1]
    return json.loads(last)


# --------------------------------------------------------------------------- results
def metadata(*, quick: bool, seconds: float, seeds: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance block stored with every result."""
    import torch

    return {
        "quick": quick,
        "full": bool(SETTINGS["full"]),
        "wall_seconds": round(seconds, 1),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "versions": versions(),
        "git": git_commit(),
        "torch_threads": torch.get_num_threads(),
        "thread_env": {
            k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        },
        "seeds": seeds or {"seed": SEED},
        "peak_rss_mb_process": round(max_rss_mb(), 1),
    }


def write_result(name: str, result: dict[str, Any], *, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<results_dir>/<name>.json`` atomically (``.tmp`` then rename).

    A result without ``meta`` (an empty or half-built dict) is refused, so a run that measured nothing
    never replaces a stored result.
    """
    if not isinstance(result, dict) or "meta" not in result:
        msg = f"Refusing to write {name}.json: the result has no 'meta' (nothing measured); the stored file is kept."
        raise ValueError(msg)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")  # two runs writing at once never share a temporary
    tmp.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    msg = f"Cannot serialise {type(obj).__name__} to JSON; convert it in the benchmark."
    raise TypeError(msg)


def md_table(header: list[str], rows: list[list[Any]], digits: int = 3) -> str:
    """A GitHub Markdown table; floats rounded to ``digits``, ``None`` shown as ``–``."""

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return "nan" if v != v else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- section cache
def cache_key(section: str, encoders: tuple[str, ...], mode: str, window: int | None) -> str:
    """Cache folder name: section + encoders + mode + a hash of the preprocessing parameters."""
    params = json.dumps({**PREPROCESS, "encoders": encoders, "mode": mode, "window": window}, sort_keys=True)
    digest = hashlib.sha1(params.encode()).hexdigest()[:8]
    win = f"_w{window}" if window else ""
    return f"{section}_{'+'.join(encoders)}_{mode}{win}_{digest}"


def crop_window(sdata: Any, half: int) -> Any:
    """A window of ``2 * half`` px around the spot nearest the tissue centre, in its own pixel frame."""
    import bitro as bt

    return bt.datasets.crop(sdata, size_um=2 * half * bt.io.get_mpp(sdata))


def _preparation(encoders: tuple[str, ...], mode: str) -> Any:
    from bitro.datasets._prepared import Preparation

    prep = Preparation(encoders=tuple(encoders), mode=mode, **PREPARATION_KW)
    assert (prep.stain_method, prep.tile_size, prep.embed_crop_um, list(prep.embed_context_um)) == (
        PREPROCESS["stain_method"],
        PREPROCESS["tile_size"],
        PREPROCESS["crop_um"],
        PREPROCESS["context_um"],
    ), "PREPROCESS no longer describes bitro's preparation recipe; update it"
    return prep


def window_um(section: str, window: int | None) -> float | None:
    """The side (µm) of a ``2 * window`` px window of ``section`` (``None``: the whole section)."""
    return None if not window else 2 * window * _section_mpp(section, str(DATA_DIR))


@functools.cache
def _section_mpp(section: str, data_dir: str) -> float:
    import bitro as bt

    return bt.io.get_mpp(bt.datasets.her2st(section, data_dir=data_dir, image=False))


def preprocess_section(
    section: str,
    *,
    encoders: tuple[str, ...] = ("efficientnet_lite0",),
    mode: str = "tile",
    window: int | None = None,
    steps: Steps | None = None,
    graph: bool = False,
) -> Any:
    """Load a HER2ST section and prepare it like ``bt.datasets.her2st(..., prepared=True)`` (→ graph), uncached.

    The first encoder writes ``obsm["X_bitro"]``; others write ``obsm["X_<encoder>"]``. ``window``
    (half-size in px) crops a central window first (for the slow crop mode). Every step is timed
    by ``steps``.
    """
    import bitro as bt
    from bitro.datasets._prepared import load_section, prepare

    steps = steps or Steps()
    prep = _preparation(encoders, mode)
    with steps("load"):
        sdata = load_section(section, crop_um=window_um(section, window), preparation=prep, data_dir=DATA_DIR)
    prepare(sdata, prep, timer=steps, desc=f"benchmarks: {section}")
    if graph:
        with steps("cell_graph"):
            bt.pp.cell_graph(sdata)
    return sdata


def load_section(section: str, *, window: int | None = None) -> Any:
    """A HER2ST section of the kit (image ``he``, spots), cropped like :func:`cached_section` crops it."""
    from bitro.datasets._prepared import load_section as _load

    return _load(
        section,
        crop_um=window_um(section, window),
        preparation=_preparation(("efficientnet_lite0",), "tile"),
        data_dir=DATA_DIR,
    )


def preprocess(
    sdata: Any,
    *,
    encoders: tuple[str, ...] = ("efficientnet_lite0",),
    mode: str = "tile",
    steps: Steps | None = None,
    graph: bool = False,
) -> Any:
    """The benchmarks' preprocessing of a loaded slide (image ``he``, spots), in place; returns ``sdata``.

    The prepared-section recipe that :func:`cached_section` stores for every section, applied here to
    any slide (e.g. a shifted one).
    """
    import bitro as bt
    from bitro.datasets._prepared import prepare

    steps = steps or Steps()
    prepare(sdata, _preparation(encoders, mode), timer=steps, desc="benchmarks: preprocess")
    if graph:
        with steps("cell_graph"):
            bt.pp.cell_graph(sdata)
    return sdata


def kit_genes(sections: dict[str, Any]) -> list[str]:
    """The HER2ST 785-gene list, restricted to the genes every section's spots table measures."""
    import bitro as bt

    return [
        g for g in bt.datasets.her2st_genes() if all(g in s["spots"].var_names for s in sections.values())
    ]


def save_tables(sdata: Any, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Store the spots and cells tables (AnnData zarr) and the scale attrs under ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for key in ("spots", "cells"):
        adata = sdata.tables[key].copy()
        adata.obsp.clear() if hasattr(adata.obsp, "clear") else None
        adata.write_zarr(tmp / f"{key}.zarr")
    (tmp / "attrs.json").write_text(
        json.dumps({"attrs": dict(sdata.attrs), "extra": extra or {}}, default=_json_default)
    )
    tmp.rename(path)


def load_tables(path: Path) -> Any:
    """A tables-only SpatialData (spots, cells and scale) from :func:`save_tables`."""
    import anndata as ad
    import spatialdata as sd

    tables = {key: ad.read_zarr(path / f"{key}.zarr") for key in ("spots", "cells")}
    out = sd.SpatialData(tables=tables)
    out.attrs.update(json.loads((path / "attrs.json").read_text())["attrs"])
    return out


def cached_section(
    section: str,
    *,
    encoders: tuple[str, ...] = ("efficientnet_lite0",),
    mode: str = "tile",
    window: int | None = None,
) -> Any:
    """Preprocessed tables of a section: bitro's prepared-section store in ``benchmarks/cache/`` (built once)."""
    import spatialdata as sd

    from bitro.datasets._prepared import load_prepared

    steps = Steps()
    sdata = load_prepared(
        section,
        crop_um=window_um(section, window),
        data_dir=DATA_DIR,
        cache_dir=CACHE_DIR,
        image=False,
        preparation=_preparation(encoders, mode),
        timer=steps,
    )
    if steps.records:  # built now: keep the peak memory of each step next to the store
        path = _prepared_path(section, encoders, mode, window)
        path.with_suffix(".steps.json").write_text(json.dumps(steps.records, indent=1))
    with warnings.catch_warnings():  # tables only: their shapes are left out on purpose
        warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
        return sd.SpatialData(
            tables={k: sdata.tables[k] for k in ("spots", "cells")}, attrs=dict(sdata.attrs)
        )


def cached_tables(name: str, build: Any) -> Any:
    """Tables of ``benchmarks/cache/<name>``, built first with ``build(steps) -> SpatialData`` when absent."""
    from bitro._logging import logger

    path = CACHE_DIR / name
    if not path.exists():
        logger.info("benchmarks: preprocessing into %s", path)
        steps = Steps()
        sdata = build(steps)
        save_tables(sdata, path, extra={"steps": steps.records, "preprocess": PREPROCESS})
    return load_tables(path)


def _prepared_path(section: str, encoders: tuple[str, ...], mode: str, window: int | None) -> Path:
    from bitro.datasets._prepared import store_key, store_path

    key = store_key(
        section,
        crop_um=window_um(section, window),
        preparation=_preparation(encoders, mode),
        data_dir=DATA_DIR,
    )
    return store_path(key, CACHE_DIR)


def cache_info(section: str, **kwargs: Any) -> dict[str, Any]:
    """Timings of the preprocessing of a cached section (``{"steps": {...}}``; ``{}`` when not cached)."""
    from bitro.datasets._prepared import read_record

    keys = {"encoders": ("efficientnet_lite0",), "mode": "tile", "window": None, **kwargs}
    path = _prepared_path(section, tuple(keys["encoders"]), keys["mode"], keys["window"])
    record = read_record(path)
    if not record:
        return {}
    steps = record.get("steps", {})
    extra = path.with_suffix(".steps.json")
    if extra.is_file():  # the benchmark's own records (with peak RSS) when it built the store
        steps = {**steps, **json.loads(extra.read_text())}
    return {"steps": steps, "preprocess": PREPROCESS}


if __name__ == "__main__":  # build the cache: python -m benchmarks._common C2 C3 ...
    import bitro as bt

    bt.settings.progress = False
    for sec in sys.argv[1:] or SECTIONS:
        t = time.perf_counter()
        cached_section(sec, encoders=("efficientnet_lite0", "morphology"))
        print(sec, round(time.perf_counter() - t, 1), flush=True)

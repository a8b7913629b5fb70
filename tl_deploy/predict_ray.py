"""``predict --ray [ADDRESS]``: the same predictor as a Ray Data pipeline, from one machine to a cluster.

    tl-deploy predict MODEL INPUT... --out FILE --ray                    # a local Ray on this machine's CPUs
    tl-deploy predict MODEL INPUT... --out FILE --ray auto               # the cluster this node is part of
    tl-deploy predict MODEL INPUT... --out FILE --ray=ray://head:10001   # a remote cluster (Ray Client)

The driver (this process) does everything the single-process ``predict`` does before and after the
images: the checks, collecting the inputs, ``--resume``'s reading of FILE, the writers, the summary
and the class-folder accuracy (``tl_deploy.predict``). Only the images themselves go through Ray:
``ray.data.from_items`` of the paths -> ``map_batches(BatchPredictor)`` on a pool of actors, each of
which loads one classifier once and turns every batch of paths into rows with ``decode_batch`` and
``predict_batch``, the functions the single-process pipeline calls, so the rows are the same.
Each finished batch streams back to the driver, which writes and fsyncs it before the next, as the
single-process run does; rows arrive in the order batches finish, not the input order.

Paths travel, not pixels: the model and every input must be readable at the same path on every node
(a shared file system), and every node needs tl_deploy and the backend installed.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_deploy import errors
from tl_deploy.errors import BackendUnavailableError, DataError, TlDeployError, UsageError
from tl_deploy.predict import Row, RowWriter, Summary, decode_batch, predict_batch, row_columns
from tl_deploy.runtime.base import usable_cpus

if TYPE_CHECKING:
    from tl_deploy.runtime import Classifier

_logger = logging.getLogger(__name__)

LOCAL = "local"  # --ray with no address: start a Ray instance in this process, on this machine's CPUs
INSTALL_HINT = "pip install 'tl_deploy[ray]'"


def import_ray() -> Any:
    """``ray`` with Ray Data, or the one line that says how to install it (before any work is done)."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra is ray[data]: a bare ray lacks its dependencies)
    except ImportError as exc:
        raise UsageError(f"--ray needs Ray Data, which is not installed ({exc}): {INSTALL_HINT}, or drop --ray.") \
            from exc
    return ray


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide the pipeline runs: the cluster, the actor pool, each actor's threads."""

    address: str  # LOCAL, "auto" or a cluster address (ray://host:10001, host:6379)
    actors: int | None  # None: as many as the cluster's CPUs hold at ``threads`` each
    threads: int  # intra-op threads of each actor's backend, and the CPUs Ray reserves for it


@dataclass(frozen=True)
class ActorOptions:
    """What each actor loads (``runtime.load``'s arguments) and how many labels a row keeps."""

    model: str
    backend: str
    precision: str
    threads: int
    verify: bool
    top_k: int


class BatchPredictor:
    """One Ray actor: a classifier loaded once in ``__init__``, then batch after batch of paths -> rows.

    Batches arrive as ``{"path": array of str}`` and leave as a pyarrow table of rows (labels and
    probabilities as lists, so an error row has empty ones), which Ray streams back to the driver.
    A model that cannot be loaded here (missing on this node, modified, no such backend) is not
    raised: Ray hands the driver only the text of an actor's exception, inside a traceback, and
    starts a failed constructor again. The actor answers each batch with the error instead (the
    ``load_error`` column), and the driver raises it as the same ``TlDeployError`` class.
    """

    def __init__(self, options: ActorOptions) -> None:
        from tl_deploy.runtime import load

        o = options
        self.top_k = o.top_k
        self.classifier: Classifier | None = None
        self.failed: TlDeployError | None = None
        try:
            self.classifier = load(o.model, backend=o.backend, precision=o.precision, threads=o.threads,
                                   verify=o.verify)
        except TlDeployError as exc:
            self.failed = exc

    def __call__(self, batch: dict[str, Any]) -> Any:
        paths = [Path(str(p)) for p in batch["path"]]
        if self.classifier is None:
            failed = self.failed or TlDeployError("the classifier was not loaded")
            return rows_table([Row(str(p)) for p in paths], f"{type(failed).__name__}: {failed}")
        return rows_table(predict_batch(self.classifier, decode_batch(paths, self.classifier.spec), self.top_k))


def rows_table(rows: Sequence[Row], load_error: str = "") -> Any:
    """Rows as a pyarrow table (float64 probabilities: the driver gets back the very floats of the rows);
    ``load_error``: ``"ClassName: message"`` of a model the actor could not load (the rows are empty)."""
    import pyarrow as pa

    types = {"path": pa.string(), "labels": pa.list_(pa.string()), "probabilities": pa.list_(pa.float64()),
             "backend": pa.string(), "precision": pa.string(), "error": pa.string()}
    columns = {name: pa.array(values, types[name]) for name, values in row_columns(rows).items()}
    return pa.table({"load_error": pa.array([load_error] * len(rows), pa.string()), **columns})


def table_rows(table: Any) -> list[Row]:
    """The rows of a table ``rows_table`` wrote; the actor's load error, raised as its own class."""
    load_error = next((e for e in table.column("load_error").to_pylist() if e), None)
    if load_error is not None:
        name, _, message = load_error.partition(": ")
        kind = getattr(errors, name, None)
        kind = kind if isinstance(kind, type) and issubclass(kind, TlDeployError) else TlDeployError
        raise kind(f"on a Ray actor: {message}")
    return [Row.from_json(d) for d in table.to_pylist()]


def start_ray(settings: RaySettings, verbose: bool = False) -> bool:
    """Connect to (or start) Ray; True when this call started it, so the caller shuts it down after
    (``run_ray_predictions(shutdown=True)``; Ray's own exit handler does it if the run never starts).

    ``predict`` calls it before it opens FILE, so an unreachable cluster, or one with no node that holds an
    actor of ``threads`` CPUs, is refused with no file left behind. A Ray
    session already open in this process (``ray.init`` by the caller) is used as it is. A local
    instance gets ``actors * threads`` CPUs: Ray schedules by those, so the pool fits it exactly.
    """
    ray = import_ray()
    if ray.is_initialized():
        pool_size(ray, settings, 1)  # its refusal
        return False
    level = logging.DEBUG if verbose else logging.WARNING
    try:
        if settings.address == LOCAL:
            actors = settings.actors or max(1, usable_cpus() // settings.threads)
            ray.init(num_cpus=actors * settings.threads, include_dashboard=False, logging_level=level)
        else:
            ray.init(address=settings.address, logging_level=level)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BackendUnavailableError(f"--ray {settings.address}: cannot connect to a Ray cluster there ({exc}): "
                                      "start one (ray start --head), check the address, or pass --ray alone for a "
                                      "local Ray.") from exc
    pool_size(ray, settings, 1)
    return True


def pool_size(ray: Any, settings: RaySettings, batches: int) -> tuple[int, int]:
    """(min, max) actors: the asked-for count (never more than there are batches), started as far as
    the cluster's nodes hold them now (an actor's ``threads`` CPUs must sit on one node).

    A fixed pool larger than the cluster would wait for CPUs forever; starting with what fits and
    letting Ray Data grow the pool to ``actors`` also serves a cluster that adds nodes on demand.
    """
    node_cpus = [int(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    fits = sum(cpus // settings.threads for cpus in node_cpus)
    if fits == 0:
        raise UsageError(f"--threads {settings.threads}: no node of the Ray cluster has that many CPUs (the most: "
                         f"{max(node_cpus, default=0)}): lower --threads.")
    wanted = min(settings.actors or fits, batches)
    if wanted > fits:
        _logger.warning("the Ray cluster holds %d actors of %d threads now: %d of the %d start, the others when "
                        "CPUs free up or nodes join", fits, settings.threads, fits, wanted)
    return min(wanted, fits), wanted


def run_ray_predictions(model: Path, paths: Sequence[Path], writer: RowWriter, *, settings: RaySettings,
                        backend: str, precision: str, verify: bool, top_k: int, batch_size: int,
                        fail_on_bad: bool = False, progress: bool = True, verbose: bool = False,
                        shutdown: bool = False) -> tuple[Summary, str]:
    """``run_predictions`` on Ray: the same rows, handed to ``writer`` batch by batch as actors finish them.

    Returns the summary and the pipeline's words for the summary line (actors, threads, where, and when
    the first rows came back: the summary's time includes starting the actors and loading their models).
    ``fail_on_bad``: raise the first unreadable image's ``DataError`` when its batch arrives (the
    batches that arrived before it are kept). ``shutdown``: stop Ray at the end (``start_ray``
    started it); a Ray not yet started is started here, and stopped.
    """
    from tqdm import tqdm

    ray = import_ray()
    started = start_ray(settings, verbose) or shutdown
    try:
        batches = math.ceil(len(paths) / batch_size)
        low, high = pool_size(ray, settings, batches)
        where = "local" if settings.address == LOCAL else settings.address
        pipeline = (f"Ray {where}: {high} actor{'s' if high > 1 else ''} x {settings.threads} "
                    f"thread{'s' if settings.threads > 1 else ''}")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver's own bar counts images
        if not verbose:  # Ray Data logs its execution plan and timings at INFO, and warns that its bars are off
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        dataset = ray.data.from_items([{"path": str(p)} for p in paths], override_num_blocks=batches)
        compute = ray.data.ActorPoolStrategy(size=high) if low == high \
            else ray.data.ActorPoolStrategy(min_size=low, max_size=high)
        options = ActorOptions(str(model), backend, precision, settings.threads, verify, top_k)
        rows_ds = dataset.map_batches(BatchPredictor, batch_size=batch_size, batch_format="numpy", compute=compute,
                                      num_cpus=settings.threads, fn_constructor_kwargs={"options": options})
        summary = Summary()
        start = time.perf_counter()
        first: float | None = None
        with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress, file=sys.stderr) as bar:
            for table in rows_ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = table_rows(table)
                bad = next((r for r in rows if r.error), None)
                if fail_on_bad and bad is not None:
                    raise DataError(f"{bad.error} (--on-bad-image fail; the {summary.written} rows of the batches "
                                    "finished before it are in the output: fix or remove the file, then run again "
                                    "with --resume)")
                writer.write(rows)
                summary.add(rows)
                bar.update(len(rows))
                first = time.perf_counter() - start if first is None else first
        summary.seconds = time.perf_counter() - start
        return summary, pipeline + (f", first rows after {first:.1f} s" if first is not None else "")
    finally:
        if started:
            ray.shutdown()

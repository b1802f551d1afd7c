"""``run_batch``: a registry task over every row of a dataset on Ray Data (docs/batch.md).

The pipeline: rows (small: ids, paths, text) -> CPU tasks read the images -> an actor pool of models runs
the task in batches -> this process writes each batch's records as a shard as soon as it arrives. Rows
whose record in the output is ``ok`` for the same task, parameters, inputs and model (``fingerprint.py``)
are skipped, so rerunning the same job resumes it; any other row runs and its new record replaces the old.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..inference.embedded import DEFAULT_MODEL_DIR
from ..io.checkpoint import CheckpointError
from ..io.hub import resolve_config
from ..io.paths import check_output_location
from ..modeling.config import UniMedVLConfig
from ..tasks.catalog import TASKS
from ..tasks.params import TaskParameterError
from ..tasks.registry import ModelLimits, Task
from ..tasks.slides import slide_selection
from .actor import TaskActor
from .fingerprint import model_identity, row_keys
from .reading import read_step
from .records import FAILED, OK, RecordStore
from .settings import BatchSettings, import_ray
from .sources import Row, read_source

__all__ = ["run_batch", "plan_rows"]

log = logging.getLogger(__name__)

READ_MEMORY = 512 * 2**20  # what a reading task asks the scheduler for (a hint, not a hard limit)


def plan_rows(task: Task, rows: list[Row], params: Mapping[str, Any], limits: ModelLimits) -> list[Row]:
    """Each row's parameters, resolved and checked by the registry: the row's own values over ``params``;
    seed ``seed + row index`` unless the row names its seed, so a row's result does not depend on the batch
    or actor it lands in. A row whose parameters are invalid (e.g. text over the limit) keeps the reason."""
    for row in rows:
        if row.error is None and task.returns == "image" and len(row.images) > 1:
            row.error = f"{task.name} takes one image; the row has {len(row.images)}"
        if row.error is not None:
            continue
        try:
            resolved = task.resolve({**params, **row.fields}, limits)
        except TaskParameterError as err:
            row.error = str(err)
            continue
        if resolved.get("series_report") and row.frame is not None:
            row.error = "a series report reads the whole series: use slices 'middle' (one row per series)"
            continue
        row.fields = resolved if "seed" in row.fields else task.item_params(resolved, row.index)
    return rows


def _start_ray(address: str | None) -> bool:
    """Connect to Ray (a cluster at ``address``, or a local instance); True when this call started it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             **({} if address else {"num_cpus": os.cpu_count()}))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours shows rows/s and ETA
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our bar replaces its progress notes
    return True


def _dataset(rows: list[Row], task: str, ckpt, load_options: dict, output: Path, window, s: BatchSettings):
    ray = import_ray()
    items = [{"id": row.id, "payload": pickle.dumps(row)} for row in rows]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // s.batch_size)))
    # reading declares its memory, so its remote arguments differ from the actors' and Ray keeps it in its
    # own CPU tasks instead of fusing it into the model actors
    slide = slide_selection(TASKS.get(task, warn=False))
    ds = ds.map(read_step, fn_kwargs={"window": window, "slide": slide}, num_cpus=s.read_cpus, memory=READ_MEMORY)
    options = dict(load_options)
    if s.actor_gpus and "device" not in options:
        options["device"] = "cuda"
    return ds.map_batches(TaskActor, fn_constructor_kwargs={
        "task": task, "ckpt": None if ckpt is None else str(ckpt), "load_options": options, "output": str(output),
        "threads": None if s.actor_gpus else s.threads()}, batch_size=s.batch_size,
        compute=ray.data.ActorPoolStrategy(size=s.num_actors),
        num_cpus=s.actor_cpus, num_gpus=s.actor_gpus or None, batch_format="numpy")


def _consume(ds, store: RecordStore, total: int, progress: bool) -> dict:
    """Write each arriving batch as a shard. Returns the rows written and the steady rate: rows per second
    from the first batch's arrival to the last one's (actor start and model load left out)."""
    from tqdm.auto import tqdm

    done, first, last, first_rows = 0, None, None, 0
    with tqdm(total=total, desc="batch", unit="row", disable=not progress) as bar:
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            store.write(json.loads(text) for text in block["record"])
            done += len(block["record"])
            bar.update(len(block["record"]))
            last = time.perf_counter()
            if first is None:
                first, first_rows = last, done
    warm = (done - first_rows) / (last - first) if first is not None and last > first else None
    return {"rows": done, "warm_rows_per_s": None if warm is None else round(warm, 3)}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _done(record: dict | None, row: Row) -> bool:
    """The row's record is ok and was made from what the row is now (same key: task, parameters, inputs,
    model); a record of an older key is stale and the row runs again."""
    return record is not None and record.get("status") == OK and record.get("key") == row.key


def _summary(rows: list[Row], latest: dict[str, dict], run: dict, extra: dict) -> dict:
    """Counts over the rows' current records (a stale record, of another key, counts as missing)."""
    mine = [latest[row.id] for row in rows if row.id in latest and latest[row.id].get("key") == row.key]
    ok = sum(r["status"] == OK for r in mine)
    failures = [{"id": r["id"], "error": r["error"]} for r in mine if r["status"] == FAILED]
    model = next((r["model"] for r in mine if r.get("model")), {})
    return {**extra, "rows": len(rows), "ok": ok, "failed": len(failures), "missing": len(rows) - len(mine),
            "run": run, "model": model, "notice": (model.get("weights") or {}).get("notice"),
            "failures": failures[:50]}


def _check_params(task: Task, params: Mapping[str, Any]) -> dict:
    """The job's own parameters parsed now, so a wrong name or value stops the job before it starts."""
    return {name: task.param(name).parse(value) for name, value in params.items()}


def _check_model(ckpt, revision: str | None) -> ModelLimits:
    """The checkpoint's limits; reading its config first fails fast, before any actor starts. A Hub id
    fetches its configuration files only here; each actor then loads the weights at the same revision."""
    if ckpt is None:
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to a Hub id given as the checkpoint; "
                                  "the embedded model has none")
        return ModelLimits.of(UniMedVLConfig.from_dir(DEFAULT_MODEL_DIR))
    return ModelLimits.of(UniMedVLConfig.from_dir(resolve_config(ckpt, revision)))


def run_batch(task: str, source: str | Path | Sequence[Row], output: str | Path, params: Mapping | None = None,
              *, ckpt: str | Path | None = None, load_options: Mapping | None = None,
              data_dir: str | Path | None = None, slices: str = "middle", window=None,
              settings: BatchSettings | None = None) -> dict:
    """Run ``task`` over every row of ``source`` (a manifest, a folder, or rows from ``rows_from_items``)
    and write one record per row under ``output``; rows already ok there are skipped. ``load_options`` go
    to ``load_model`` in each actor (device, dtype, weights, revision of a Hub id, quantisation...). Returns
    the summary, also written to ``output/summary.json``."""
    spec, settings, output = TASKS.get(task), settings or BatchSettings(), Path(output)
    load_options = dict(load_options or {})
    import_ray()  # without Ray, say so before anything is written
    if isinstance(source, (str, Path)):
        check_output_location([output], [source, *([data_dir] if data_dir else [])])
        rows = read_source(source, spec, data_dir, slices)
    else:
        rows = list(source)
    plan_rows(spec, rows, _check_params(spec, params or {}), _check_model(ckpt, load_options.get("revision")))
    row_keys(spec.name, rows, model_identity(ckpt, load_options))
    job = {"task": spec.name, "input": str(source) if isinstance(source, (str, Path)) else "items",
           "format": settings.format}
    with RecordStore(output, settings.format) as store:
        return _run(store, rows, job, settings, lambda s, pending: _dataset(
            pending, spec.name, ckpt, load_options, output, window, s))


def _run(store: RecordStore, rows: list[Row], job: dict, settings: BatchSettings, make_dataset) -> dict:
    """Resume: compact, run the rows without a current ok record, compact again and write the summary (also
    when stopped)."""
    latest = store.compact()
    pending = [row for row in rows if not _done(latest.get(row.id), row)]
    started, start, consumed, interrupted = False, time.perf_counter(), {"rows": 0}, False
    try:
        if pending:
            started = _start_ray(settings.address)
            resources = import_ray().cluster_resources()
            settings = settings.resolved(resources.get("CPU", 1), resources.get("GPU", 0))
            consumed = _consume(make_dataset(settings, pending), store, len(pending), settings.progress)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        seconds = time.perf_counter() - start
        latest = store.compact() if not interrupted else store.load()
        written = consumed["rows"]
        run = {**consumed, "seconds": round(seconds, 3), "rows_per_s": round(written / seconds, 3) if written
               else None, "skipped_ok": len(rows) - len(pending), "interrupted": interrupted}
        job["settings"] = {k: v for k, v in vars(settings).items() if k != "progress"}
        summary = _summary(rows, latest, run, job)
        _write_json(store.folder.parent / "summary.json", summary)
        if started:
            import_ray().shutdown()
    return summary

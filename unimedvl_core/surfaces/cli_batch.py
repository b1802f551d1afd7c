"""``unimedvl batch``: a registry task over a whole dataset on Ray Data (docs/batch.md).

    unimedvl batch --task vqa --input vqa.jsonl --output runs/vqa --max-new-tokens 64
    unimedvl batch --task super_resolution --input mr_series/ --output runs/sr --slices all --steps 25
    unimedvl batch --task vqa --input vqa.parquet --output runs/vqa --address auto      (a running cluster)

Every task parameter of the registry is an option (``unimedvl tasks`` lists which task takes which); a
manifest row's own values (its question, prompt or instruction) take precedence over them. Rerunning the
same command resumes: rows already ok for the same task, parameters, inputs and model are skipped; failed
and changed ones run again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..batch.records import OutputBusyError
from ..batch.settings import BatchSettings, RayUnavailableError
from ..tasks.catalog import TASKS
from ..tasks.params import Param
from .cli_tasks import HelpFormatter, add_model_args, parse_window

__all__ = ["add_batch_command", "run_batch_command", "load_options_of", "EXIT_ROWS_FAILED"]

_PREFIX = "param_"
EXIT_ROWS_FAILED = 3  # beside cli.py's 0 ok, 1 internal, 2 bad input, 130 interrupted (docs/batch.md#exit-status)
EXIT_STATUS = """exit status:
  0    every row has an ok record
  3    the job finished but some rows failed or have no record (one line on stderr: the counts and where
       summary.json is; the ok rows' results are kept, and rerunning the command retries only the others)
  2    bad arguments, an unreadable source, Ray not installed, or an output folder another job is writing to
  1    an internal error
  130  interrupted (rerun the command to resume)"""


def _param_options(p: argparse.ArgumentParser) -> None:
    """One option per parameter name of any task, unset by default (then the row's value or the default
    applies); values are parsed by the chosen task's own parameter."""
    group = p.add_argument_group("task parameters (see: unimedvl tasks)")
    seen: dict[str, Param] = {}
    for task in TASKS:
        for param in task.params:
            if param.name in seen:
                continue
            seen[param.name] = param
            flags = [f"--{param.name.replace('_', '-')}", *param.flags]
            kwargs = dict(dest=_PREFIX + param.name, default=None, help=param.help or " ")
            if param.type == "bool":
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
            else:
                group.add_argument(*flags, metavar="VALUE", **kwargs)


def add_batch_command(sub) -> None:
    p = sub.add_parser("batch", help="run a task over a dataset (manifest or folder) on Ray Data",
                       description=__doc__, epilog=EXIT_STATUS, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--task", required=True, help=f"the task: {', '.join(TASKS.names())}")
    p.add_argument("--input", required=True, help="JSONL/Parquet manifest, or a folder of DICOM/NIfTI/PNG")
    p.add_argument("--output", type=Path, required=True, help="output folder (records/, images/, summary.json)")
    p.add_argument("--data-dir", default=None, help="folder relative image paths of a manifest are in "
                   "(default: the manifest's folder, then its images/)")
    p.add_argument("--slices", default="middle", choices=["middle", "all"],
                   help="folders: one row per series/volume (its middle slice) or one per slice")
    p.add_argument("--window", type=parse_window, default=None, metavar="C,W|PRESET",
                   help="CENTRE,WIDTH or a preset (soft_tissue, lung, bone, brain...)")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"], help="record shards: JSONL or Parquet")
    p.add_argument("--address", default=None, help="'auto' or ray://HOST:10001 to join a cluster (default: local)")
    p.add_argument("--num-actors", type=int, default=None, help="model replicas (default: one per GPU, else "
                   "half the CPUs, at most 4)")
    p.add_argument("--batch-size", type=int, default=BatchSettings.batch_size, help="rows per model call")
    p.add_argument("--actor-cpus", type=float, default=None, help="CPUs per model actor (may be fractional)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per model actor (default: 1 if any)")
    _param_options(p)


def load_options_of(args) -> dict:
    """Every model option of ``add_model_args`` that was given, for ``load_model`` in each actor (also
    ``unimedvl evaluate``'s, whose large datasets run on Ray Data)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_model_args(probe)
    names = {a.dest for a in probe._actions} - {"ckpt", "no_progress"}
    return {name: getattr(args, name) for name in sorted(names) if getattr(args, name, None) is not None}


def run_batch_command(args) -> int:
    from ..batch.job import run_batch

    params = {k[len(_PREFIX):]: v for k, v in vars(args).items() if k.startswith(_PREFIX) and v is not None}
    settings = BatchSettings(address=args.address, num_actors=args.num_actors, actor_gpus=args.gpus_per_actor,
                             actor_cpus=args.actor_cpus, batch_size=args.batch_size, format=args.format,
                             progress=not args.no_progress)
    try:
        summary = run_batch(args.task, args.input, args.output, params, ckpt=args.ckpt,
                            load_options=load_options_of(args), data_dir=args.data_dir, slices=args.slices,
                            window=args.window, settings=settings)
    except (RayUnavailableError, OutputBusyError) as err:  # usage errors: install Ray, wait or choose --output
        print(f"error: {err}", file=sys.stderr)
        return 2
    rate = summary["run"]["rows_per_s"]
    print(f"{summary['rows']} rows: {summary['ok']} ok, {summary['failed']} failed"
          + (f" ({summary['run']['rows']} run now, {rate} rows/s)" if rate else " (nothing left to run)"))
    if summary.get("notice"):
        print(f"note: {summary['notice']}", file=sys.stderr)
    print(f"wrote {args.output / 'records'} and {args.output / 'summary.json'}")
    return _rows_status(summary, args.output / "summary.json")


def _rows_status(summary: dict, summary_path: Path) -> int:
    """0 when every row is ok; else ``EXIT_ROWS_FAILED`` and one stderr line with the counts (no row's
    error text: reasons may name patients' files, and they are in the summary and the records)."""
    not_ok = summary["failed"] + summary["missing"]
    if not not_ok:
        return 0
    missing = f", {summary['missing']} without a record" if summary["missing"] else ""
    print(f"incomplete: {not_ok} of {summary['rows']} rows not ok ({summary['ok']} ok, {summary['failed']} failed"
          f"{missing}); reasons in {summary_path}; rerun to retry them", file=sys.stderr)
    return EXIT_ROWS_FAILED

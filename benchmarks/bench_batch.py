"""Batch VQA on phantoms with the embedded model (docs/batch.md#throughput): rows/s of the one-by-one task
API in this process against ``run_batch`` on a local Ray with 1 and 2 CPU actors. Prints JSON.

    .venv/bin/python benchmarks/bench_batch.py [--rows 192] [--batch-size 8] [--max-new-tokens 16]

Two figures per Ray run: ``rows_per_s`` over the whole job (Ray start, actor start and model load
included) and ``warm_rows_per_s`` from the first written shard to the last (the steady state that a long
job sees).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from unimedvl_core.batch import BatchSettings, run_batch
from unimedvl_core.data.phantoms import write_dataset
from unimedvl_core.inference.embedded import load_default_model
from unimedvl_core.io.medical_io import read_image
from unimedvl_core.tasks.catalog import TASKS


def manifest(root: Path, rows: int) -> Path:
    write_dataset(root, max(4, rows // 7 + 2), seed=11, size=64)
    lines = (root / "vqa.jsonl").read_text().splitlines()
    if len(lines) < rows:
        raise SystemExit(f"only {len(lines)} phantom rows; ask for fewer")
    path = root / f"vqa{rows}.jsonl"
    path.write_text("\n".join(lines[:rows]) + "\n")
    return path


def one_by_one(path: Path, max_new_tokens: int, threads: int) -> dict:
    """The task API, one row at a time, images read in the same loop (what ``unimedvl evaluate`` did)."""
    torch.set_num_threads(threads)
    task, model = TASKS.get("vqa"), load_default_model(progress=False)
    start = time.perf_counter()
    for i, line in enumerate(path.read_text().splitlines()):
        record = json.loads(line)
        image = read_image(path.parent / "images" / record["input_img"][0]["path"])
        question = record["message"][0]["value"].replace("<image>", "").strip()
        task.run(model, image, task.item_params({"question": question, "max_new_tokens": max_new_tokens}, i))
    seconds = time.perf_counter() - start
    rows = i + 1
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 2),
            "threads": torch.get_num_threads()}


def on_ray(path: Path, actors: int, batch_size: int, max_new_tokens: int) -> dict:
    cpus = os.cpu_count() or 1
    settings = BatchSettings(num_actors=actors, actor_cpus=cpus / (2 * actors), batch_size=batch_size,
                             progress=False)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run_batch("vqa", path, out, {"max_new_tokens": max_new_tokens}, settings=settings)
        seconds = time.perf_counter() - start
    if summary["ok"] != summary["rows"]:
        raise SystemExit(f"rows failed: {summary['failures'][:3]}")
    return {"actors": actors, "actor_cpus": settings.actor_cpus, "rows": summary["rows"],
            "seconds": round(seconds, 2), "rows_per_s": round(summary["rows"] / seconds, 2),
            "warm_rows_per_s": summary["run"]["warm_rows_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        path = manifest(Path(root), args.rows)
        results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                   "rows": args.rows, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                   "one_by_one": one_by_one(path, args.max_new_tokens, os.cpu_count() or 1),
                   "one_by_one_1_thread": one_by_one(path, args.max_new_tokens, 1),
                   "ray_1_actor": on_ray(path, 1, args.batch_size, args.max_new_tokens),
                   "ray_2_actors": on_ray(path, 2, args.batch_size, args.max_new_tokens)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

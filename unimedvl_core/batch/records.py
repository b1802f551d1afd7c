"""The output records of a batch job: shards under ``<output>/records/``, written atomically, read back to
resume.

Each shard is ``part-<generation>-<sequence>.jsonl`` (or ``.parquet``), written to a temporary name and
renamed, so a killed job leaves whole shards only; every ``ROLL_UP`` shards a run wrote are merged into
one. When shards disagree about a row id the record of the
latest shard (highest generation, then sequence) wins; ``compact`` writes the winners, ordered by row, into
one new shard and deletes the older ones, so that after a finished run each row id has exactly one record
on disk (docs/batch.md#resume).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path

__all__ = ["RecordStore", "FORMATS", "make_record", "OK", "FAILED", "OutputBusyError"]

FORMATS = ("jsonl", "parquet")
OK, FAILED = "ok", "failed"
_SHARD = re.compile(r"^part-(\d+)-(\d+)\.(jsonl|parquet)$")
_JSON_COLUMNS = ("params", "model")  # nested values kept as JSON text in Parquet shards


class OutputBusyError(RuntimeError):
    """Another job is writing to the same output folder."""


def make_record(row, status: str, error: str | None = None, text: str | None = None,
                outputs: list[str] | None = None, params: dict | None = None, model: dict | None = None,
                task: str = "") -> dict:
    """One output record: ``id``, ``row``, ``status`` (ok | failed), ``error``, the result (``text``,
    ``outputs``: image files relative to the output folder, labelled synthetic), the ``reference`` of the
    manifest, the task ``params``, the ``model`` (name and weights' provenance), the slices a series report
    read (``frames``) and the row's ``key`` (what the result depends on; a resumed job reruns a row whose
    key changed)."""
    return {"id": row.id, "row": row.index, "status": status, "error": error, "task": task, "text": text,
            "outputs": list(outputs or []), "synthetic": bool(outputs), "reference": row.reference,
            "inputs": row.shown_inputs(), "slice": row.frame, "frames": row.frames, "params": params or {},
            "model": model or {}, "key": row.key}


def _write_jsonl(records: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _write_parquet(records: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{k: json.dumps(v, default=str) if k in _JSON_COLUMNS else v for k, v in r.items()} for r in records]
    pq.write_table(pa.Table.from_pylist(rows), path)


def _read_shard(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [{k: json.loads(v) if k in _JSON_COLUMNS and isinstance(v, str) else v for k, v in r.items()}
            for r in rows]


class RecordStore:
    """The shards of one output folder."""

    ROLL_UP = 256  # shards of one run merged into one (2048 rows at the default batch size)

    def __init__(self, output: str | Path, fmt: str = "jsonl"):
        if fmt not in FORMATS:
            raise ValueError(f"output format must be one of {', '.join(FORMATS)} (got {fmt!r})")
        self.folder = Path(output) / "records"
        self.fmt = fmt
        self.folder.mkdir(parents=True, exist_ok=True)
        self.generation = max((key[0] for key, _ in self.shards()), default=0) + 1
        self.sequence = 0
        self._lock = None
        self._recent: list[Path] = []  # shards written since the last roll-up

    def __enter__(self) -> "RecordStore":
        """Hold the folder's lock: one job at a time writes its records."""
        import fcntl

        self._lock = open(self.folder / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise OutputBusyError(f"another batch job is writing to {self.folder.parent}; wait for it or choose "
                                  "another output folder") from None
        for stale in self.folder.glob(".tmp-*"):  # a shard a killed job did not finish: never renamed
            stale.unlink()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.close()  # closing releases the lock

    read = staticmethod(_read_shard)

    def shards(self) -> list[tuple[tuple[int, int], Path]]:
        """The finished shards, oldest first: ((generation, sequence), path)."""
        found = [((int(m.group(1)), int(m.group(2))), p) for p in self.folder.iterdir()
                 if (m := _SHARD.match(p.name))]
        return sorted(found)

    def load(self) -> dict[str, dict]:
        """The latest record of every row id."""
        latest: dict[str, dict] = {}
        for _, path in self.shards():
            for record in _read_shard(path):
                latest[str(record["id"])] = record
        return latest

    def _put(self, records: list[dict], path: Path) -> None:
        """``path`` holding ``records``, atomically: a temporary file renamed into place."""
        tmp = self.folder / f".tmp-{uuid.uuid4().hex}-{path.name}"
        (_write_parquet if self.fmt == "parquet" else _write_jsonl)(records, tmp)
        os.replace(tmp, path)

    def write(self, records: Iterable[dict]) -> Path | None:
        """A new shard holding ``records``; every ``ROLL_UP`` shards, this run's small shards are merged."""
        records = list(records)
        if not records:
            return None
        path = self.folder / f"part-{self.generation:05d}-{self.sequence:06d}.{self.fmt}"
        self.sequence += 1
        self._put(records, path)
        self._recent.append(path)
        if len(self._recent) >= self.ROLL_UP:
            self._roll_up()
        return path

    def _roll_up(self) -> None:
        """Merge the shards written since the last roll-up into the newest of them (its name, so its place in
        the latest-wins order is kept), then delete the others: a long job keeps few files. Within one run a
        row is written once, so merging is concatenating; a kill in between leaves duplicates of equal
        records, which the rule resolves."""
        merged = [record for path in self._recent for record in _read_shard(path)]
        self._put(merged, self._recent[-1])
        for path in self._recent[:-1]:
            path.unlink()
        self._recent = []

    def compact(self) -> dict[str, dict]:
        """Keep only the latest record of each id, ordered by row, in one new shard; returns them."""
        old = self.shards()
        latest = self.load()
        if len(old) <= 1 and all(p.suffix == f".{self.fmt}" for _, p in old):
            return latest
        self.generation, self.sequence, self._recent = self.generation + 1, 0, []
        self._put(sorted(latest.values(), key=lambda r: (r.get("row") is None, r.get("row"), str(r["id"]))),
                  self.folder / f"part-{self.generation:05d}-000000.{self.fmt}")
        for _, path in old:
            path.unlink()
        self.generation, self.sequence = self.generation + 1, 0
        return latest

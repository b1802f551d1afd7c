"""Batch inference on Ray Data (unimedvl_core.batch): results equal the sequential task API, reruns resume
to exactly one record per row, bad rows are recorded, DICOM folders and the released formats are read.

One local Ray session (2 CPUs) serves the module; the jobs use CPU actors of the embedded model (2 where
results must not depend on the actor a row lands in)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from unimedvl_core.batch import BatchSettings, run_batch
from unimedvl_core.batch.records import OutputBusyError, RecordStore
from unimedvl_core.batch.settings import RayUnavailableError, import_ray
from unimedvl_core.data.phantoms import write_dataset
from unimedvl_core.io.medical_io import read_image
from unimedvl_core.tasks.catalog import TASKS

from .test_hub import hub_cache  # noqa: F401  (the offline Hub cache fixture)

ROOT = Path(__file__).parents[1]
TWO_ACTORS = BatchSettings(num_actors=2, actor_cpus=0.5, batch_size=8, progress=False)
ONE_ACTOR = BatchSettings(num_actors=1, actor_cpus=1, batch_size=8, progress=False)  # fewer model loads


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(embedded_model):
    return embedded_model


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Phantom studies in the released formats; ``vqa64.jsonl``: the first 64 VQA rows (SFT JSONL, image
    paths relative to ``images/``)."""
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, 10, seed=3, size=64)
    lines = (root / "vqa.jsonl").read_text().splitlines()[:64]
    assert len(lines) == 64
    (root / "vqa64.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _records(output: Path) -> list[dict]:
    """Every record on disk (all shards), not just the latest of each id."""
    store = RecordStore(output)
    return [r for _, path in store.shards() for r in RecordStore.read(path)]


def _sequential(model, task_name: str, image, params: dict, index: int):
    """The task API, one call, with the actors' one thread (float sums depend on the thread count)."""
    task, threads = TASKS.get(task_name), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return task.run(model, image, task.item_params(task.resolve(params), index))
    finally:
        torch.set_num_threads(threads)


def _question(line: str) -> tuple[str, str]:
    record = json.loads(line)
    return record["input_img"][0]["path"], record["message"][0]["value"].replace("<image>", "").strip()


def test_vqa_two_actors_equal_sequential_api(ray_session, model, phantoms, tmp_path):
    out = tmp_path / "vqa"
    summary = run_batch("vqa", phantoms / "vqa64.jsonl", out, {"max_new_tokens": 12}, settings=TWO_ACTORS)
    assert (summary["rows"], summary["ok"], summary["failed"]) == (64, 64, 0)
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(str(i) for i in range(64))  # exactly one each
    by_id = {r["id"]: r for r in records}
    for i, line in enumerate((phantoms / "vqa64.jsonl").read_text().splitlines()):
        path, question = _question(line)
        expected = _sequential(model, "vqa", read_image(phantoms / "images" / path),
                               {"question": question, "max_new_tokens": 12}, i).text
        assert by_id[str(i)]["text"] == expected, i
        assert by_id[str(i)]["reference"] == json.loads(line)["message"][1]["value"]
    assert records[0]["model"]["weights"]["demo"] is True and summary["notice"]
    again = run_batch("vqa", phantoms / "vqa64.jsonl", out, {"max_new_tokens": 12}, settings=TWO_ACTORS)
    assert again["run"]["rows"] == 0 and again["run"]["skipped_ok"] == 64 and len(_records(out)) == 64


def test_fixed_seed_generation_equals_sequential_api(ray_session, model, tmp_path):
    prompts = [f"Axial CT image with {k} lesions." for k in range(5)]
    rows = [{"prompt": p} for p in prompts] + [{"id": "own-seed", "prompt": prompts[0], "seed": 123}]
    manifest = tmp_path / "t2i.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "t2i"
    params = {"num_inference_steps": 3, "seed": 40}
    summary = run_batch("text_to_image", manifest, out, params, settings=TWO_ACTORS)
    assert summary["ok"] == 6
    by_id = {r["id"]: r for r in _records(out)}
    for i, prompt in enumerate(prompts):
        expected = _sequential(model, "text_to_image", None, {**params, "prompt": prompt}, i).image
        record = by_id[str(i)]
        assert record["params"]["seed"] == 40 + i and record["synthetic"] is True
        png = out / next(p for p in record["outputs"] if p.endswith(".png"))
        with Image.open(png) as img:
            assert img.info.get("SyntheticData") == "YES"
            np.testing.assert_array_equal(np.asarray(img.convert("RGB")), np.asarray(expected.convert("RGB")))
    assert by_id["own-seed"]["params"]["seed"] == 123  # a row's own seed is kept, not offset


def test_bad_rows_are_recorded_and_retried(ray_session, phantoms, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = sorted((phantoms / "images").glob("*_ct.png"))[:2]
    (data / "broken.dcm").write_bytes(b"DICM" * 64)  # not a DICOM file
    lines = [json.dumps({"id": "ok1", "image": str(good[0]), "question": "Is there a lesion?"}),
             json.dumps({"id": "missing", "image": str(data / "later.png"), "question": "Is there a lesion?"}),
             json.dumps({"id": "dicom", "image": str(data / "broken.dcm"), "question": "Is there a lesion?"}),
             json.dumps({"id": "long", "image": str(good[1]), "question": "x" * 5000}),
             "{not json",
             json.dumps({"id": "noimage", "question": "Is there a lesion?"})]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = run_batch("vqa", manifest, out, {"max_new_tokens": 4}, settings=ONE_ACTOR)
    by_id = {r["id"]: r for r in _records(out)}
    assert (summary["ok"], summary["failed"]) == (1, 5)
    assert by_id["ok1"]["status"] == "ok" and by_id["ok1"]["error"] is None
    assert "no such file" in by_id["missing"]["error"]
    assert by_id["dicom"]["status"] == "failed" and by_id["dicom"]["error"]
    assert "longer than 4000" in by_id["long"]["error"]
    assert "not JSON" in by_id["4"]["error"]
    assert "no image" in by_id["noimage"]["error"]
    Image.open(good[1]).save(data / "later.png")  # the missing file appears: its row is retried
    again = run_batch("vqa", manifest, out, {"max_new_tokens": 4}, settings=ONE_ACTOR)
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(by_id)  # one record per row after the rerun
    assert {r["id"]: r["status"] for r in records}["missing"] == "ok"
    assert (again["ok"], again["failed"], again["run"]["skipped_ok"]) == (2, 4, 1)


def test_killed_run_then_rerun_gives_every_row_once(ray_session, model, phantoms, tmp_path):
    manifest = tmp_path / "vqa16.jsonl"
    manifest.write_text("\n".join((phantoms / "vqa64.jsonl").read_text().splitlines()[:16]) + "\n")
    out = tmp_path / "killed"
    # sampling at a high temperature rarely stops early: each row takes its 48 tokens
    params = ["--do-sample", "--temperature", "5", "--max-new-tokens", "32", "--seed", "7"]
    cmd = [sys.executable, "-m", "unimedvl_core.surfaces.cli", "batch", "--task", "vqa", "--input", str(manifest),
           "--output", str(out), "--data-dir", str(phantoms / "images"), "--num-actors", "1", "--batch-size", "2",
           "--no-progress", "--address", ray.get_runtime_context().gcs_address, *params]  # joins this cluster
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not list((out / "records").glob("part-*")):
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's driver (its own process group); Ray ends its actors
        proc.wait()
    before = _records(out)
    assert 0 < len(before) < 16 and all(r["status"] == "ok" for r in before), "not killed mid-way"
    summary = run_batch("vqa", manifest, out, {"do_sample": True, "temperature": 5, "max_new_tokens": 32,
                                               "seed": 7}, data_dir=phantoms / "images", settings=TWO_ACTORS)
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(str(i) for i in range(16))
    assert summary["ok"] == 16 and summary["run"]["skipped_ok"] == len(before)
    lines = manifest.read_text().splitlines()
    for i in (0, 15):  # a row's sampled answer depends on its row only, not on the run or batch it ran in
        path, question = _question(lines[i])
        expected = _sequential(model, "vqa", read_image(phantoms / "images" / path),
                               {"question": question, "do_sample": True, "temperature": 5, "max_new_tokens": 32,
                                "seed": 7}, i).text
        assert next(r for r in records if r["id"] == str(i))["text"] == expected


def test_dicom_folder_source_writes_labelled_dicom(ray_session, tmp_path):
    from unimedvl_core.surfaces.bundle import write_sample_inputs

    folder = tmp_path / "inputs"
    write_sample_inputs(folder)
    out = tmp_path / "edits"
    summary = run_batch("edit", folder, out, {"instruction": "Remove the lesions.", "num_inference_steps": 2},
                        slices="all", settings=BatchSettings(num_actors=2, actor_cpus=0.5, batch_size=2,
                                                             progress=False))
    records = {r["id"]: r for r in _records(out)}
    # 2 PNGs, 3 NIfTI slices, 3 DICOM slices: one row per slice
    assert summary["rows"] == 8 and summary["ok"] == 8, summary["failures"]
    dicom = sorted(i for i in records if i.startswith("dicom_ct_series"))
    assert dicom == ["dicom_ct_series:0", "dicom_ct_series:1", "dicom_ct_series:2"]
    import pydicom

    datasets = [pydicom.dcmread(out / next(p for p in records[i]["outputs"] if p.endswith(".dcm"))) for i in dicom]
    assert all(ds.SyntheticData == "YES" and "DERIVED" in ds.ImageType for ds in datasets)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1  # one derived series, whichever actor wrote it
    assert sorted(int(ds.InstanceNumber) for ds in datasets) == [1, 2, 3]
    assert any(p.endswith(".nii.gz") for p in records["mr_t2_phantom.nii.gz:1"]["outputs"])


def test_parquet_manifest_with_image_bytes_and_parquet_shards(ray_session, model, phantoms, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, expected = [], []
    for i, line in enumerate((phantoms / "vqa64.jsonl").read_text().splitlines()[:6]):
        path, question = _question(line)
        data = (phantoms / "images" / path).read_bytes()  # inline bytes, as PathVQA is published
        rows.append({"image": {"bytes": data, "path": None}, "question": question})
        expected.append(_sequential(model, "vqa", read_image(phantoms / "images" / path),
                                    {"question": question, "max_new_tokens": 8}, i).text)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "vqa.parquet")
    out = tmp_path / "pq"
    summary = run_batch("vqa", tmp_path / "vqa.parquet", out, {"max_new_tokens": 8},
                        settings=BatchSettings(num_actors=2, actor_cpus=0.5, batch_size=4, format="parquet",
                                               progress=False))
    assert summary["ok"] == 6
    shards = list((out / "records").glob("part-*.parquet"))
    assert len(shards) == 1
    got = {r["id"]: r for r in pq.read_table(shards[0]).to_pylist()}
    assert [got[str(i)]["text"] for i in range(6)] == expected
    assert json.loads(got["0"]["params"])["max_new_tokens"] == 8


def test_cli_bad_arguments_are_one_line_errors(tmp_path, capsys):
    from unimedvl_core.surfaces.cli import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "question": "q"}) + "\n")
    status = main(["batch", "--task", "vqa", "--input", str(manifest), "--output", str(tmp_path / "o"),
                   "--prompt", "a prompt"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "prompt" in err
    status = main(["batch", "--task", "vqa", "--input", str(tmp_path / "absent.jsonl"), "--output",
                   str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "absent.jsonl" in err and len(err.splitlines()) == 1
    status = main(["batch", "--task", "vqa", "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert status == 2 and "inside the input folder" in capsys.readouterr().err


def test_cli_exit_status_says_whether_every_row_is_ok(ray_session, phantoms, tmp_path, capsys):
    from unimedvl_core.surfaces.cli import main
    from unimedvl_core.surfaces.cli_batch import EXIT_ROWS_FAILED

    good = sorted((phantoms / "images").glob("*_ct.png"))[0]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"id": "ok1", "image": str(good), "question": "Is there a lesion?"}) + "\n"
                        + json.dumps({"id": "later", "image": str(tmp_path / "later.png"), "question": "Why?"}) + "\n")
    out = tmp_path / "out"
    argv = ["batch", "--task", "vqa", "--input", str(manifest), "--output", str(out), "--max-new-tokens", "4",
            "--num-actors", "1", "--actor-cpus", "1", "--no-progress"]
    status = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_ROWS_FAILED == 3
    line = next(e for e in err if e.startswith("incomplete:"))  # the demo model's note may come first
    assert "1 of 2 rows not ok (1 ok, 1 failed)" in line and str(out / "summary.json") in line
    assert "later.png" not in line  # counts only; the reason is in summary.json
    assert {r["id"]: r["status"] for r in _records(out)} == {"ok1": "ok", "later": "failed"}  # success kept
    Image.open(good).save(tmp_path / "later.png")
    assert main(argv) == 0  # the rerun completes the job
    assert not any(e.startswith("incomplete:") for e in capsys.readouterr().err.splitlines())


def test_missing_ray_names_the_extra(monkeypatch, phantoms, tmp_path, capsys):
    from unimedvl_core.surfaces.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailableError, match=r"unimedvl-core\[batch\]"):
        import_ray()
    status = main(["batch", "--task", "vqa", "--input", str(phantoms / "vqa64.jsonl"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "unimedvl-core[batch]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written


def test_resume_rule_latest_shard_wins_and_compaction(tmp_path):
    store = RecordStore(tmp_path)
    store.write([{"id": "a", "row": 0, "status": "failed"}, {"id": "b", "row": 1, "status": "ok"}])
    store.write([{"id": "a", "row": 0, "status": "ok"}])
    (store.folder / ".tmp-unfinished-part-00009-000000.jsonl").write_text('{"id": "a", "row": 0, "st')
    with RecordStore(tmp_path) as reopened:  # a killed job's unfinished shard is dropped
        assert not list(reopened.folder.glob(".tmp-*"))
        with pytest.raises(OutputBusyError, match="another batch job"):
            RecordStore(tmp_path).__enter__()  # a second job on the same output is refused
        latest = reopened.compact()
    assert {k: v["status"] for k, v in latest.items()} == {"a": "ok", "b": "ok"}
    assert [r["id"] for r in _records(tmp_path)] == ["a", "b"]
    assert [p.name for p in reopened.folder.glob("part-*")] == ["part-00003-000000.jsonl"]


def test_evaluation_above_threshold_runs_on_ray_with_the_same_answers(ray_session, model, phantoms, monkeypatch):
    from unimedvl_core.batch.model_spec import ModelOnDemand
    from unimedvl_core.data import evaluation as ev

    items = ev.read_sft_jsonl(phantoms / "vqa64.jsonl")[:10]
    loads = []
    on_demand = ModelOnDemand(None, {"dtype": "float32"}, lambda: loads.append(1) or model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actor runs
    try:
        records, scores = ev.evaluate_vqa(on_demand, items, max_new_tokens=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(loads) == 1 and on_demand.loaded  # the one-by-one path loads the model here, once
    calls = []
    monkeypatch.setattr(ev, "BATCH_THRESHOLD", 5)
    monkeypatch.setattr(ev, "_answers_one_by_one", lambda *a, **k: calls.append(a) or [])
    on_ray, ray_scores = ev.evaluate_vqa(on_demand, items, max_new_tokens=8, progress=False)
    assert not calls  # the Ray path answered
    assert len(loads) == 1 and not on_demand.loaded  # the driver's copy was released and none loaded again
    assert on_demand.name == model.name
    assert [r["prediction"] for r in on_ray] == [r["prediction"] for r in records]
    assert ray_scores == scores
    never_here = ModelOnDemand(None, {"dtype": "float32"}, lambda: loads.append(1) or model)
    ev.evaluate_vqa(never_here, items[:6], max_new_tokens=2, progress=False)
    assert len(loads) == 1 and never_here.notice == model.provenance.notice  # from the actors' summary
    held, _ = ev.evaluate_vqa(model, items, max_new_tokens=8, progress=False)  # a caller's loaded model works too
    assert [r["prediction"] for r in held] == [r["prediction"] for r in records]


def test_long_runs_roll_small_shards_up(tmp_path, monkeypatch):
    monkeypatch.setattr(RecordStore, "ROLL_UP", 3)
    store = RecordStore(tmp_path)
    store.write([{"id": "a", "row": 0, "status": "failed"}])
    later = RecordStore(tmp_path)  # the next run
    for k in range(7):
        later.write([{"id": str(10 + k), "row": 10 + k, "status": "ok"}] + ([{"id": "a", "row": 0, "status": "ok"}]
                                                                          if k == 0 else []))
    names = sorted(p.name for _, p in later.shards())
    # run 1's shard, two merged shards of three (named after their newest) and the last one
    assert names == ["part-00001-000000.jsonl", "part-00002-000002.jsonl", "part-00002-000005.jsonl",
                     "part-00002-000006.jsonl"]
    latest = later.load()
    assert latest["a"]["status"] == "ok" and len(latest) == 8
    assert len(_records(tmp_path)) == 9  # "a" twice until the run's compaction


# ----------------------------------------------------------------------------------------------------------
# review fixes: resume by row key, series reports, unreadable volumes, Hub ids, a busy output


def _limits():
    from unimedvl_core.inference.embedded import DEFAULT_MODEL_DIR
    from unimedvl_core.modeling.config import UniMedVLConfig
    from unimedvl_core.tasks.registry import ModelLimits

    return ModelLimits.of(UniMedVLConfig.from_dir(DEFAULT_MODEL_DIR))


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_row_key_follows_task_params_inputs_and_model(phantoms, tmp_path):
    from unimedvl_core.batch.fingerprint import model_identity, row_keys
    from unimedvl_core.batch.job import plan_rows
    from unimedvl_core.batch.sources import read_source
    from unimedvl_core.surfaces.bundle import write_sample_inputs
    image = tmp_path / "a.png"
    Image.open(sorted((phantoms / "images").glob("*_ct.png"))[0]).save(image)
    folder = tmp_path / "inputs"
    write_sample_inputs(folder)
    manifest = _manifest(tmp_path / "m.jsonl", [{"id": "a", "image": str(image), "question": "Lesion?"}])

    def keys(task="vqa", params=None, source=manifest, model=None) -> dict[str, str]:
        spec = TASKS.get(task)
        rows = plan_rows(spec, read_source(source, spec), params or {"max_new_tokens": 4}, _limits())
        row_keys(spec.name, rows, model_identity(model, {}))
        return {row.id: row.key for row in rows}

    first = keys()
    assert keys() == first  # nothing changed: the row is done
    assert keys(params={"max_new_tokens": "4"}) == first  # as the CLI gives it: the same resolved value
    assert model_identity(str(tmp_path) + "/", {"weights": "ema"}) == model_identity(tmp_path, {})
    assert keys(params={"max_new_tokens": 5})["a"] != first["a"]
    assert keys(task="report")["a"] != first["a"]
    assert keys(model="other/ckpt")["a"] != first["a"]
    _manifest(manifest, [{"id": "a", "image": str(image), "question": "Any lesion?"}])
    assert keys()["a"] != first["a"]  # the manifest's content for the id changed
    edited = keys()
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert keys()["a"] != edited["a"]  # the image file was replaced
    series = keys("report", {}, folder)
    (folder / "dicom_ct_series" / "extra.dcm").write_bytes(b"x")  # a file added to the series folder
    changed = keys("report", {}, folder)
    assert changed["dicom_ct_series"] != series["dicom_ct_series"]
    assert changed["ct_phantom.png"] == series["ct_phantom.png"]


def test_resume_reruns_rows_of_another_task_or_changed_content(ray_session, phantoms, tmp_path):
    images = sorted((phantoms / "images").glob("*_ct.png"))[:3]
    rows = [{"id": f"r{i}", "image": str(p), "question": "Is there a lesion?"} for i, p in enumerate(images)]
    manifest = _manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    first = run_batch("vqa", manifest, out, {"max_new_tokens": 2}, settings=ONE_ACTOR)
    assert first["ok"] == 3
    rows[1]["question"] = "Which organ is shown?"
    _manifest(manifest, rows)
    again = run_batch("vqa", manifest, out, {"max_new_tokens": 2}, settings=ONE_ACTOR)
    assert (again["ok"], again["run"]["rows"], again["run"]["skipped_ok"]) == (3, 1, 2)
    assert {r["id"]: r["params"]["question"] for r in _records(out)}["r1"] == "Which organ is shown?"
    report = run_batch("report", manifest, out, {"max_new_tokens": 2}, settings=ONE_ACTOR)
    assert (report["ok"], report["run"]["rows"], report["run"]["skipped_ok"]) == (3, 3, 0)
    records = _records(out)
    assert len(records) == 3 and {r["task"] for r in records} == {"report"}  # replaced, one record per row


def test_series_report_reads_key_slices_and_a_broken_volume_fails_its_row(ray_session, model, tmp_path):
    from unimedvl_core.io.medical_io import read_key_slices
    from unimedvl_core.surfaces.bundle import write_sample_inputs

    folder = tmp_path / "inputs"
    write_sample_inputs(folder)
    (folder / "broken.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "reports"
    params = {"series_report": True, "key_slices": 3, "max_new_tokens": 4}
    summary = run_batch("report", folder, out, params, settings=ONE_ACTOR)
    records = {r["id"]: r for r in _records(out)}
    assert (summary["ok"], summary["failed"]) == (4, 1) and records["broken.nii.gz"]["status"] == "failed"
    assert records["dicom_ct_series"]["frames"] == [0, 1, 2]  # the series, not its middle slice
    assert records["mr_t2_phantom.nii.gz"]["frames"] == [0, 1, 2]
    assert records["ct_phantom.png"]["frames"] == [None]  # a 2-D image is its own key slice
    slices = read_key_slices(str(folder / "dicom_ct_series"), 3)
    expected = _sequential(model, "report", slices, params, records["dicom_ct_series"]["row"]).text
    assert records["dicom_ct_series"]["text"] == expected


def test_unreadable_volume_is_a_row_error_when_listing_slices(tmp_path):
    from unimedvl_core.batch.job import plan_rows
    from unimedvl_core.batch.sources import read_source
    from unimedvl_core.surfaces.bundle import write_sample_inputs

    write_sample_inputs(tmp_path)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    rows = {row.id: row for row in read_source(tmp_path, TASKS.get("vqa"), slices="all")}
    assert rows["broken.nii.gz"].error and "\n" not in rows["broken.nii.gz"].error
    assert [i for i in rows if i.startswith("mr_t2")] == [f"mr_t2_phantom.nii.gz:{k}" for k in range(3)]
    assert all(row.error is None for i, row in rows.items() if i != "broken.nii.gz")
    report = TASKS.get("report")
    planned = plan_rows(report, read_source(tmp_path, report, slices="all"), {"series_report": True}, _limits())
    assert all("whole series" in row.error for row in planned if row.frame is not None)


def test_hub_id_checkpoint_is_resolved_with_its_revision(hub_cache, tmp_path, capsys):  # noqa: F811
    from unimedvl_core.batch.job import _check_model
    from unimedvl_core.modeling.config import UniMedVLConfig
    from unimedvl_core.surfaces.cli import main
    from unimedvl_core.tasks.registry import ModelLimits

    from .conftest import PARITY_CKPT
    from .test_hub import REPO

    expected = ModelLimits.of(UniMedVLConfig.from_dir(PARITY_CKPT))
    assert _check_model(REPO, None) == expected == _check_model(REPO, "v0")
    with pytest.raises(ValueError, match="applies to a Hub id"):
        _check_model(None, "v0")
    manifest = _manifest(tmp_path / "m.jsonl", [{"image": "a.png", "question": "q"}])
    for ckpt, revision, message in ((REPO, "v9", f"{REPO}@v9 is not in the Hugging Face cache"),
                                    ("General-Medical-AI/Unknown", None, "not in the Hugging Face cache")):
        status = main(["batch", "--task", "vqa", "--input", str(manifest), "--output", str(tmp_path / "o"),
                       "--ckpt", ckpt, *(["--revision", revision] if revision else [])])
        err = capsys.readouterr().err.strip()
        assert status == 2 and message in err and len(err.splitlines()) == 1


def test_busy_output_is_a_usage_error(phantoms, tmp_path, capsys):
    from unimedvl_core.surfaces.cli import main

    out = tmp_path / "o"
    with RecordStore(out):  # another job holds the output folder
        status = main(["batch", "--task", "vqa", "--input", str(phantoms / "vqa64.jsonl"), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "another batch job" in err and len(err.splitlines()) == 1
    assert "internal error" not in err

"""Issue 15 point 7 on the bundle, the MAP, the batch actor and the server: a series report reads key slices
of the series in one context and writes one report; per-slice image outputs of a NIfTI volume make one
volume; every image file names the weights and carries the demonstration model's notice; the results JSON
says the notice once."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from unimedvl_core.io.provenance import DEMO_NOTICE
from unimedvl_core.surfaces.bundle import write_sample_inputs

FAST = {"max_new_tokens": 4}


@pytest.fixture(scope="module")
def embedded(embedded_model):
    return embedded_model


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """The bundle's sample inputs: two PNGs, a three-slice NIfTI volume and a three-slice DICOM CT series."""
    folder = tmp_path_factory.mktemp("samples")
    write_sample_inputs(folder)
    return folder


def spy_reports(model, monkeypatch) -> list[int]:
    """How many images each report call of ``model`` read (a list of slices counts its slices)."""
    calls: list[int] = []
    original = model.generate_report

    def counting(image, *args, **kwargs):
        calls.append(len(image) if isinstance(image, list) else 1)
        return original(image, *args, **kwargs)

    monkeypatch.setattr(model, "generate_report", counting)
    return calls


# ----- the MAP, run in-process: its operators without the Holoscan graph -----


def _map_run(model, samples: Path, out: Path, tasks: list[dict], mode: str = "key") -> dict:
    from monai.deploy.core import Fragment

    from unimedvl_core.surfaces.deploy.config import DeployConfig, parse_task
    from unimedvl_core.surfaces.deploy.operators import (
        SliceSelectionOperator,
        UniMedVLTaskOperator,
        UniMedVLWriterOperator,
    )

    fragment = Fragment()
    datasets = [pydicom.dcmread(p) for p in sorted((samples / "dicom_ct_series").glob("*.dcm"))]
    series = SliceSelectionOperator(fragment, mode=mode, name="select").series_slices(
        str(datasets[0].SeriesInstanceUID), "CT", "Phantom CT", "test", datasets)
    config = DeployConfig(tasks=[parse_task(t) for t in tasks])
    results = UniMedVLTaskOperator(fragment, config=config, model=model, name="tasks").process([series])
    UniMedVLWriterOperator(fragment, output_folder=out, model_getter=lambda: model, name="write").write(results, {})
    return json.loads((out / "summary.json").read_text())


def test_map_series_report_reads_key_slices_and_writes_one_sr_referencing_them(embedded, samples, tmp_path,
                                                                                 monkeypatch):
    calls = spy_reports(embedded, monkeypatch)
    summary = _map_run(embedded, samples, tmp_path / "out",
                       [{"task": "report", "series_report": True, "key_slices": 2, **FAST}])
    assert calls == [2]  # one report, from two key slices read together
    entry = summary["series"][0]
    assert entry["slices"] == [1]  # the per-slice selection (key: the middle slice) is unchanged
    (report,) = entry["texts"]
    assert report["slices"] == [0, 2] and report["slice"] is None
    (sr_output,) = [o for o in entry["outputs"] if o["kind"] == "sr"]
    sr = pydicom.dcmread(tmp_path / "out" / sr_output["file"])
    referenced = {str(i.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    instances = [str(pydicom.dcmread(p).SOPInstanceUID)
                 for p in sorted((samples / "dicom_ct_series").glob("*.dcm"))]
    assert {instances[0], instances[2]} <= referenced  # the key slices, though only slice 1 was selected
    assert len(list((tmp_path / "out" / "dicom").glob("sr_*.dcm"))) == 1


def test_map_key_slices_span_the_series_or_the_asked_range(samples):
    """Key slices spread over the whole series with ``slices: key`` (though one slice is selected), over
    [start, stop) with a range; only the chosen instances are read, in patient order."""
    from monai.deploy.core import Fragment

    from unimedvl_core.surfaces.deploy.operators import SliceSelectionOperator

    fragment = Fragment()
    datasets = [pydicom.dcmread(p) for p in sorted((samples / "dicom_ct_series").glob("*.dcm"), reverse=True)]

    def key(count: int, **selection) -> list[int]:
        series = SliceSelectionOperator(fragment, name=f"select{len(selection)}", **selection).series_slices(
            "1.2.3", "CT", "", "test", datasets)
        return [s.frame for s in series.key_slices(count)]

    assert key(2, mode="key") == [0, 2] and key(5, mode="key") == [0, 1, 2]
    assert key(1, mode="range", start=1, stop=3) == [2] and key(5, mode="range", start=1, stop=3) == [1, 2]


def test_map_images_and_summary_carry_the_demo_notice_once(embedded, samples, tmp_path):
    summary = _map_run(embedded, samples, tmp_path / "out",
                       [{"task": "super_resolution", "scale": 2, "num_inference_steps": 1}])
    (image,) = [o for o in summary["series"][0]["outputs"] if o["kind"] == "image"]
    ds = pydicom.dcmread(tmp_path / "out" / image["file"])
    assert DEMO_NOTICE in ds.ImageComments and ds.SyntheticData == "YES"
    png = Image.open(tmp_path / "out" / image["preview"])
    assert png.text["UniMedVLNotice"] == DEMO_NOTICE and embedded.provenance.short in png.text["UniMedVLWeights"]
    assert (tmp_path / "out" / "summary.json").read_text().count(DEMO_NOTICE) == 1
    assert summary["model"]["notice"] == DEMO_NOTICE


# ----- the MONAI bundle, in-process through its inference config -----

BUNDLE = Path(__file__).resolve().parents[1] / "monai_bundle"


def _bundle_run(dataset: Path, out: Path, task: str, params: dict, **extra) -> dict:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "inference.json"), workflow_type="infer",
                        bundle_root=str(BUNDLE), task=task, task_params=params, dataset_dir=str(dataset),
                        output_dir=str(out), device="cpu", **extra)  # no download there: the embedded model
    wf.initialize()
    wf.run()
    return json.loads((out / "results.json").read_text())


def test_bundle_series_report_reads_key_slices_of_each_volume(samples, tmp_path, monkeypatch):
    from unimedvl_core import UniMedVL

    calls: list[int] = []
    original = UniMedVL.generate_report

    def counting(self, image, *args, **kwargs):
        calls.append(len(image) if isinstance(image, list) else 1)
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(UniMedVL, "generate_report", counting)
    summary = _bundle_run(samples, tmp_path / "out", "report", {"series_report": True, "key_slices": 2, **FAST})
    records = {Path(r["input"]).name: r for r in summary["results"]}
    assert len(summary["results"]) == 4 and sorted(calls) == [1, 1, 2, 2]  # one report per input
    for volume in ("dicom_ct_series", "mr_t2_phantom.nii.gz"):
        assert records[volume]["slices"] == [0, 2] and records[volume]["status"] == "done"
        assert records[volume]["parameters"]["series_report"] is True
    assert records["ct_phantom.png"]["slices"] == [None]  # a 2-D image is its own one-image series
    assert (tmp_path / "out" / "results.json").read_text().count(DEMO_NOTICE) == 1


def test_bundle_per_slice_outputs_of_a_nifti_make_one_labelled_volume(samples, tmp_path):
    import nibabel as nib

    data = tmp_path / "in"
    data.mkdir()
    (data / "mr.nii.gz").write_bytes((samples / "mr_t2_phantom.nii.gz").read_bytes())
    summary = _bundle_run(data, tmp_path / "out", "contrast_translation", {"num_inference_steps": 1},
                          slices="all")
    assert [r["slice"] for r in summary["results"]] == [0, 1, 2]
    assert {r["volume"] for r in summary["results"]} == {str(tmp_path / "out" / "mr.nii.gz")}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["mr.nii.gz"]
    volume, source = nib.load(str(tmp_path / "out" / "mr.nii.gz")), nib.load(str(data / "mr.nii.gz"))
    assert volume.shape == source.shape and volume.affine == pytest.approx(source.affine)
    assert b"SYNTHETIC" in volume.header["descrip"].tobytes()
    for record in summary["results"]:
        png = Image.open(record["outputs"][0])
        assert png.text["UniMedVLNotice"] == DEMO_NOTICE and png.text["SyntheticData"] == "YES"
    assert (tmp_path / "out" / "results.json").read_text().count(DEMO_NOTICE) == 1


# ----- the batch actor (without Ray) and the server's image responses -----


def _ct_slice(samples: Path):
    from unimedvl_core.io.medical_io import read_slices

    return read_slices(samples / "dicom_ct_series", frames=[1])[0]


def _assert_labelled(png: Image.Image, ds, model) -> None:
    assert png.text["UniMedVLNotice"] == DEMO_NOTICE and png.text["UniMedVLWeights"] == model.provenance.short
    assert DEMO_NOTICE in ds.ImageComments and ds.SyntheticData == "YES"


def test_batch_actor_images_name_the_weights_and_the_demo_notice(embedded, samples, tmp_path, monkeypatch):
    from unimedvl_core.batch.actor import TaskActor
    from unimedvl_core.batch.sources import Row
    from unimedvl_core.inference import embedded as loading

    monkeypatch.setattr(loading, "load_model", lambda ckpt, **kwargs: embedded)  # the module's model, loaded once
    actor = TaskActor("super_resolution", None, {}, str(tmp_path / "out"))
    row = Row("ct", 0, images=["slice.dcm"], fields={"scale": 2, "num_inference_steps": 1}, frame=1)
    (record,) = actor.run_rows([row], [[_ct_slice(samples)]])
    assert record["status"] == "ok" and sorted(record["outputs"]) == ["images/ct.dcm", "images/ct.png"]
    _assert_labelled(Image.open(tmp_path / "out" / "images" / "ct.png"),
                     pydicom.dcmread(tmp_path / "out" / "images" / "ct.dcm"), actor.model)


@pytest.mark.parametrize("output", ["png", "dicom"])
def test_server_image_responses_name_the_weights_and_the_demo_notice(embedded, samples, output):
    import io

    from fastapi.testclient import TestClient

    from unimedvl_core.surfaces.server.app import create_app

    with TestClient(create_app(model=embedded)) as client:
        upload = samples / "dicom_ct_series" / "slice_002.dcm"
        response = client.post("/v1/image-to-image/super_resolution", data={"output": output, "scale": "2",
                                                                            "num_inference_steps": "1"},
                               files={"image": ("slice.dcm", upload.read_bytes(), "application/dicom")})
    assert response.status_code == 200, response.text
    assert response.headers["X-UniMedVL-Notice"] == DEMO_NOTICE
    assert response.headers["X-UniMedVL-Weights"] == embedded.provenance.short
    if output == "png":
        assert Image.open(io.BytesIO(response.content)).text["UniMedVLNotice"] == DEMO_NOTICE
    else:
        ds = pydicom.dcmread(io.BytesIO(response.content))
        assert DEMO_NOTICE in ds.ImageComments and embedded.provenance.short.split(" (")[0] in ds.ImageComments

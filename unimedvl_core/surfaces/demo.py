"""``unimedvl demo``: every kind of task once on a procedural phantom CT slice in DICOM, each result printed
beside the phantom's ground truth (or what is measured in the generated image). Tasks run through the
registry with its defaults, as on every other surface. The phantom's DICOM study is kept in ``input/``
beside the outputs, and the MONAI Deploy application's command that reads it is printed."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid

from ..data.evaluation import psnr_ssim
from ..data.phantoms import REMOVE_LESIONS, analyze, caption, degrade_for_super_resolution, render, sample_phantom
from ..io.atomic import write_text_atomic
from ..io.dicom_output import write_dicom
from ..io.medical_io import read_slices
from ..io.outputs import label_with_provenance, write_image_outputs
from ..io.synthetic import save_png
from ..tasks.catalog import TASKS
from ..tasks.registry import RunOptions

__all__ = ["run_demo", "phantom_ct_dicom", "map_command"]


def phantom_ct_dicom(image: np.ndarray, seed: int):
    """A phantom CT slice as a DICOM CT image (Hounsfield units under a 40/400 window), on the header of
    pydicom's bundled CT test file with a new synthetic patient, study and series."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = (image[..., 0].astype(np.float64) / 255.0 - 0.5) * 400.0 + 40.0
    ds.Rows, ds.Columns = hu.shape
    ds.PixelSpacing = [float(v) * 128 / hu.shape[0] for v in ds.PixelSpacing]  # same field of view
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (np.round(hu) + 1024).astype(np.int16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 40, 400
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PatientName, ds.PatientID = "PHANTOM^DEMO", f"PHANTOM{seed}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SyntheticData = "YES"
    ds.SeriesDescription = "Procedural phantom (synthetic)"
    return ds


class _Demo:
    def __init__(self, model, out: Path, seed: int, steps: int | None, progress: bool):
        self.model, self.out, self.seed = model, out, seed
        self.image_params = {"seed": seed, **({"num_inference_steps": steps} if steps else {})}
        self.options = RunOptions(progress=progress)
        self.rng = np.random.default_rng(seed)

    def run(self, task: str, image=None, **params):
        is_image_task = TASKS.get(task).returns == "image"
        return TASKS.get(task).run(self.model, image, {**(self.image_params if is_image_task else {}), **params},
                                   self.options)

    def text_to_image(self, summary: dict) -> None:
        wanted = sample_phantom(self.rng, family="radiology", size=64, count=1, pid="demo-t2i")
        prompt = caption(wanted, "ct")
        image = label_with_provenance(self.run("text_to_image", prompt=prompt).image, self.model.provenance)
        summary["outputs"]["text_to_image"] = str(save_png(image, self.out / "text_to_image.png"))
        summary["measured"]["text_to_image"] = {"prompt": prompt, "lesions_asked": wanted.count,
                                                "lesions_found": analyze(image, "ct").count}

    def super_resolution(self, ct, pixels: np.ndarray, summary: dict) -> None:
        low = ct.to_pil().resize((16, 16), Image.Resampling.BOX)
        image = label_with_provenance(self.run("super_resolution", low, scale=4).image, self.model.provenance)
        summary["outputs"]["super_resolution"] = [str(save_png(image, self.out / "super_resolution.png"))]
        summary["measured"]["super_resolution_psnr_db"] = {
            "model": round(psnr_ssim(np.asarray(image), pixels)[0], 2),
            "bicubic": round(psnr_ssim(degrade_for_super_resolution(pixels), pixels)[0], 2)}

    def counterfactual(self, ct, thing: str, summary: dict) -> None:
        result = self.run("counterfactual", ct, instruction=REMOVE_LESIONS.format(things=f"{thing}s"),
                          max_explanation_tokens=48)
        paths = write_image_outputs(result.image, ct, self.out / "edit", "counterfactual",
                                    result.image.info.get("Description", ""), generate_uid(), 1,
                                    provenance=self.model.provenance)
        summary["outputs"]["edit"] = [str(p) for p in paths]
        summary["measured"]["edit"] = {"explanation": result.text,
                                       "lesions_after": analyze(result.image, "ct").count}


def map_command(study: Path, out: Path, ckpt: Path | None, demo_model: bool) -> str:
    """The MONAI Deploy application's local run on the demo's input study (monai_deploy_app/README.md)."""
    allow = "UNIMEDVL_ALLOW_DEMO_MODEL=1 " if demo_model and ckpt is None else ""
    model = f" -m {shlex.quote(str(ckpt))}" if ckpt is not None else ""
    return (f"{allow}python monai_deploy_app/app.py -i {shlex.quote(str(study))} "
            f"-o {shlex.quote(str(out))}{model}")


def _print_summary(summary: dict, count: int, thing: str, path: Path) -> None:
    print(f"model: {summary['model']}; input: a phantom CT slice with {count} {thing}s ({summary['input_study']})")
    for key, value in summary["outputs"].items():
        print(f"{key}: {value}")
    for key, value in summary["measured"].items():
        print(f"measured {key}: {value}")
    print(f"wrote {path} ({summary['seconds']} s)")
    print(f"the MONAI Deploy application reads the same study (from the repository root, after "
          f"'bash install.sh deploy'):\n  {summary['map_command']}")


def run_demo(model, out: Path, seed: int = 0, steps: int | None = None, progress: bool = True,
             ckpt: Path | None = None) -> dict:
    """Every kind of task on a phantom CT slice; its DICOM study is kept in ``out/input`` for the MAP."""
    out.mkdir(parents=True, exist_ok=True)
    demo = _Demo(model, out, seed, steps, progress)
    phantom = sample_phantom(demo.rng, family="radiology", size=64, count=2, pid="demo")
    pixels = render(phantom, "ct")
    study = write_dicom(phantom_ct_dicom(pixels, seed), out / "input" / "phantom_ct.dcm")
    ct = read_slices(study)[0]
    summary = {"model": model.name, "weights": model.provenance.to_dict(), "notice": model.provenance.notice,
               "input": "phantom CT slice (DICOM, synthetic)", "input_study": str(study.parent),
               "map_command": map_command(study.parent, out / "map", ckpt, model.provenance.demo),
               "truth": {"lesions": phantom.count}, "outputs": {}, "measured": {}}
    t0 = time.perf_counter()
    question = f"How many {phantom.thing}s are there?"
    summary["outputs"]["vqa"] = {question: demo.run("vqa", ct, question=question, max_new_tokens=12).text}
    summary["outputs"]["report"] = demo.run("report", ct, max_new_tokens=96).text
    demo.text_to_image(summary)
    demo.super_resolution(ct, pixels, summary)
    demo.counterfactual(ct, phantom.thing, summary)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    _print_summary(summary, phantom.count, phantom.thing, out / "summary.json")
    return summary

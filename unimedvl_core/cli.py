"""The ``unimedvl`` command line.

    unimedvl vqa --image chest.dcm --question "Is there a pleural effusion?" [--ckpt DIR]
    unimedvl report --image chest.dcm
    unimedvl generate --prompt "Axial CT of the chest with two nodules" --out ct.png
    unimedvl edit --image t2.nii.gz --instruction "..." --out flair.png
    unimedvl super-resolution | stain | translate | counterfactual ...
    unimedvl demo

Without ``--ckpt`` the embedded default model is used. Image outputs are PNG files labelled as synthetic,
plus DICOM Secondary Capture objects in the source study when the input was DICOM.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from pydicom.uid import generate_uid

from . import __version__
from .defaults import load_model
from .medical_io import ImageReadError, MedicalImage, read_slices
from .outputs import write_image_outputs
from .synthetic import save_png

__all__ = ["main", "build_parser"]

log = logging.getLogger("unimedvl")


def _window(text: str | None):
    if text is None:
        return None
    if "," in text:
        centre, width = text.split(",", 1)
        return float(centre), float(width)
    return text


def _slices(text: str | None) -> list[int] | None | str:
    """None (middle slice), "all", or a list of indices from "N" or "A:B" (B exclusive)."""
    if text is None or text == "all":
        return text
    if ":" in text:
        a, b = text.split(":", 1)
        return list(range(int(a), int(b)))
    return [int(text)]


def _read_inputs(args) -> list[MedicalImage]:
    sel = _slices(args.slices)
    frames = None if sel in (None, "all") else sel
    return read_slices(args.image, frames=frames, window=_window(args.window), series_uid=args.series_uid,
                       middle_only=sel is None)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", type=Path, help="checkpoint folder in the released layout (default: embedded model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--device-map", default=None, help="'auto' to spread over GPUs / offload (accelerate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="PNG/JPEG/TIFF, DICOM file or series folder, NIfTI")
    p.add_argument("--slices", default=None, help="slice/frame of a volume: N, A:B or all (default: middle)")
    p.add_argument("--window", default=None, help="CENTRE,WIDTH or a preset (soft_tissue, lung, bone, brain...)")
    p.add_argument("--series-uid", default=None, help="series to read when a folder holds several")


def _add_generation_args(p: argparse.ArgumentParser, img_default: float, interval_default: str,
                         renorm_default: str) -> None:
    p.add_argument("--steps", type=int, default=49, help="velocity evaluations (49 = the reference's 50 timesteps)")
    p.add_argument("--cfg-text", type=float, default=4.0)
    p.add_argument("--cfg-img", type=float, default=img_default)
    p.add_argument("--cfg-interval", default=interval_default, help="START,END on the flow time")
    p.add_argument("--timestep-shift", type=float, default=3.0)
    p.add_argument("--renorm", default=renorm_default, choices=["global", "channel", "text_channel"])
    p.add_argument("--renorm-min", type=float, default=0.0)


def _add_output_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", type=Path, default=Path(default),
                   help="output PNG path (a folder when several slices are processed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimedvl", description="UniMedVL: read and make medical images.")
    parser.add_argument("--version", action="version", version=f"unimedvl-core {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe the model")
    _add_model_args(p)

    for name, help_text in (("vqa", "answer a question about an image"), ("report", "draft a report")):
        p = sub.add_parser(name, help=help_text)
        _add_model_args(p)
        _add_image_args(p)
        if name == "vqa":
            p.add_argument("--question", required=True)
        else:
            p.add_argument("--prompt", default=None, help="override the report prompt")
        p.add_argument("--max-new-tokens", type=int, default=512)
        p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--json", type=Path, default=None, help="also write the answers to this JSON file")

    p = sub.add_parser("generate", help="text-to-image")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    _add_generation_args(p, 1.0, "0.4,1.0", "global")
    _add_output_args(p, "generated.png")

    edits = {
        "edit": "image-to-image from an instruction",
        "super-resolution": "x2/x4 super-resolution",
        "stain": "virtual staining (H&E to IHC)",
        "translate": "MRI contrast translation (e.g. T2 to FLAIR)",
        "counterfactual": "counterfactual edit with its explanation",
    }
    for name, help_text in edits.items():
        p = sub.add_parser(name, help=help_text)
        _add_model_args(p)
        _add_image_args(p)
        if name in ("edit", "counterfactual"):
            p.add_argument("--instruction", required=True)
        else:
            p.add_argument("--instruction", default=None, help="override the task's instruction")
        if name == "super-resolution":
            p.add_argument("--scale", type=int, default=4, choices=[2, 4])
        if name == "stain":
            p.add_argument("--stain", default="IHC")
        if name == "translate":
            p.add_argument("--source", default="T2")
            p.add_argument("--target", default="FLAIR")
        if name == "edit":
            p.add_argument("--height", type=int, default=None)
            p.add_argument("--width", type=int, default=None)
            p.add_argument("--analyze-first", action="store_true", help="describe an editing strategy first")
        p.add_argument("--vae-posterior", default="mean", choices=["mean", "sample"])
        _add_generation_args(p, 2.0, "0.0,1.0", "text_channel")
        _add_output_args(p, f"{name}.png")

    from .training.launch import build_parser as train_parser

    train_parser(sub.add_parser("train", help="train a curriculum stage (see configs/train/)"))

    p = sub.add_parser("phantoms", help="write procedural phantom studies in the released training formats")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=1000, help="number of phantom studies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")

    p = sub.add_parser("phantom-eval", help="score a model on freshly generated phantoms")
    _add_model_args(p)
    p.add_argument("--n", type=int, default=200, help="phantom studies for VQA")
    p.add_argument("--t2i", type=int, default=120, help="text-to-image samples")
    p.add_argument("--sr", type=int, default=60, help="super-resolution samples")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--eval-seed", type=int, default=20261123)
    p.add_argument("--out", type=Path, default=None, help="write the scores as JSON")

    p = sub.add_parser("evaluate", help="score a model on benchmark or released-format data")
    _add_model_args(p)
    p.add_argument("--vqa", action="append", default=[], metavar="FORMAT=PATH",
                   help="VQA data: vqa_rad, slake, pathvqa, omnimedvqa, gmai_mmbench or sft_jsonl (repeatable)")
    p.add_argument("--reports", default=None, help="report SFT JSONL (BLEU / ROUGE-L)")
    p.add_argument("--editing", action="append", default=[], help="editing JSONL (PSNR / SSIM; repeatable)")
    p.add_argument("--t2i", default=None, help="text-to-image JSONL with reference images (FID)")
    p.add_argument("--fid-extractor", default="unimedvl-vit", help="unimedvl-vit or hf:<path to a vision model>")
    p.add_argument("--data-dir", default=None, help="folder that relative data paths are in")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per evaluation")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("outputs/eval"))

    p = sub.add_parser("serve", help="run the HTTP inference server (FastAPI)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None, help="bearer token (default: UNIMEDVL_TOKEN); required beyond loopback")

    p = sub.add_parser("demo", help="run every task on the embedded default model and write the results")
    _add_model_args(p)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--steps", type=int, default=20)
    return parser


def _generation_kwargs(args) -> dict:
    lo, hi = (float(v) for v in args.cfg_interval.split(","))
    return dict(num_inference_steps=args.steps, cfg_text_scale=args.cfg_text, cfg_img_scale=args.cfg_img,
                cfg_interval=(lo, hi), timestep_shift=args.timestep_shift, cfg_renorm_type=args.renorm,
                cfg_renorm_min=args.renorm_min, progress=not args.no_progress)


def _load(args):
    model = load_model(args.ckpt, device=args.device, dtype=args.dtype, progress=not args.no_progress,
                       **({"weights": args.weights, "device_map": args.device_map} if args.ckpt else {}))
    model.progress = not args.no_progress
    return model


def _text_task(args, model) -> int:
    sources = _read_inputs(args)
    results = []
    for src in sources:
        kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                      top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed))
        if args.command == "vqa":
            text = model.answer(src, args.question, **kwargs)
        else:
            text = model.generate_report(src, prompt=args.prompt, modality=src.modality, **kwargs)
        results.append({"source": src.source, "slice": src.frame, "text": text})
        prefix = f"[slice {src.frame}] " if len(sources) > 1 else ""
        print(prefix + text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": model.name, "task": args.command, "results": results}, indent=2))
    return 0


def _stem(path: Path) -> Path:
    """``--out result.png`` names the outputs result.png, result.dcm, ..."""
    return path.with_suffix("") if path.suffix.lower() == ".png" else path


def _image_task(args, model) -> int:
    sources = _read_inputs(args)
    gen = _generation_kwargs(args)
    series_uid = generate_uid()
    several = len(sources) > 1
    for i, src in enumerate(sources):
        generator = torch.Generator().manual_seed(args.seed + i)
        common = dict(generator=generator, vae_posterior=args.vae_posterior, **gen)
        explanation = None
        if args.command == "edit":
            image = model.edit_image(src, args.instruction, height=args.height, width=args.width,
                                     analyze_first=args.analyze_first, **common)
        elif args.command == "super-resolution":
            image = model.super_resolve(src, scale=args.scale, instruction=args.instruction, **common)
        elif args.command == "stain":
            image = model.virtual_stain(src, stain=args.stain, instruction=args.instruction, **common)
        elif args.command == "translate":
            image = model.translate_contrast(src, source=args.source, target=args.target,
                                             instruction=args.instruction, **common)
        else:
            result = model.counterfactual_edit(src, args.instruction, **common)
            image, explanation = result.image, result.explanation
        out = args.out / f"slice_{src.frame:04d}" if several else _stem(args.out)
        for path in write_image_outputs(image, src, out, args.command, image.info.get("Description", ""),
                                         series_uid, instance=i + 1):
            print(f"wrote {path}")
        if explanation is not None:
            (out.parent / f"{out.name}.txt").write_text(explanation + "\n")
            print(f"explanation: {explanation}")
    return 0


def _generate(args, model) -> int:
    image = model.generate_image(args.prompt, height=args.height, width=args.width,
                                 generator=torch.Generator().manual_seed(args.seed), **_generation_kwargs(args))
    print(f"wrote {save_png(image, args.out)}")
    return 0


def _phantom_ct_dicom(image, seed: int):
    """A phantom CT slice as a DICOM CT image (Hounsfield units under a 40/400 window), on the header of
    pydicom's bundled CT test file with a new synthetic patient, study and series."""
    import numpy as np
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


def _demo(args, model) -> int:
    """Every task once on a procedural phantom CT slice in DICOM, with its ground truth beside the answers."""
    import numpy as np

    from .evaluation import psnr_ssim
    from .phantoms import REMOVE_LESIONS, analyze, caption, degrade_for_super_resolution, render, sample_phantom

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    phantom = sample_phantom(rng, family="radiology", size=64, count=2, pid="demo")
    pixels = render(phantom, "ct")
    ct = read_slices(_phantom_ct_dicom(pixels, args.seed))[0]
    thing = phantom.thing
    steps = dict(num_inference_steps=args.steps, progress=not args.no_progress)
    summary = {"model": model.name, "input": "phantom CT slice (DICOM, synthetic)",
               "truth": {"lesions": phantom.count}, "outputs": {}, "measured": {}}
    t0 = time.perf_counter()
    question = f"How many {thing}s are there?"
    summary["outputs"]["vqa"] = {question: model.answer(ct, question, max_new_tokens=12)}
    summary["outputs"]["report"] = model.generate_report(ct, modality="CT", max_new_tokens=96)

    wanted = sample_phantom(rng, family="radiology", size=64, count=1, pid="demo-t2i")
    prompt = caption(wanted, "ct")
    t2i = model.generate_image(prompt, generator=torch.Generator().manual_seed(args.seed), **steps)
    summary["outputs"]["text_to_image"] = str(save_png(t2i, out / "text_to_image.png"))
    summary["measured"]["text_to_image"] = {"prompt": prompt, "lesions_asked": wanted.count,
                                            "lesions_found": analyze(t2i, "ct").count}

    low = ct.to_pil().resize((16, 16), Image.Resampling.BOX)
    sr = model.super_resolve(low, scale=4, generator=torch.Generator().manual_seed(args.seed), **steps)
    summary["outputs"]["super_resolution"] = [str(save_png(sr, out / "super_resolution.png"))]
    summary["measured"]["super_resolution_psnr_db"] = {
        "model": round(psnr_ssim(np.asarray(sr), pixels)[0], 2),
        "bicubic": round(psnr_ssim(degrade_for_super_resolution(pixels), pixels)[0], 2)}

    edit = model.counterfactual_edit(ct, REMOVE_LESIONS.format(things=f"{thing}s"),
                                     generator=torch.Generator().manual_seed(args.seed), max_explanation_tokens=48,
                                     **steps)
    paths = write_image_outputs(edit.image, ct, out / "edit", "counterfactual", edit.image.info.get("Description", ""),
                                generate_uid(), 1)
    summary["outputs"]["edit"] = [str(p) for p in paths]
    summary["measured"]["edit"] = {"explanation": edit.explanation, "lesions_after": analyze(edit.image, "ct").count}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"model: {model.name}; input: a phantom CT slice with {phantom.count} {thing}s")
    for key, value in summary["outputs"].items():
        print(f"{key}: {value}")
    for key, value in summary["measured"].items():
        print(f"measured {key}: {value}")
    print(f"wrote {out / 'summary.json'} ({summary['seconds']} s)")
    return 0


def _phantoms(args) -> int:
    from .phantoms import write_dataset

    counts = write_dataset(args.out, args.n, seed=args.seed, size=args.size)
    for name, count in counts.items():
        print(f"{name}: {count}")
    print(f"wrote {args.out}")
    return 0


def _phantom_eval(args, model) -> int:
    from .phantom_eval import evaluate_phantoms

    scores = evaluate_phantoms(model, n=args.n, t2i=args.t2i, sr=args.sr, steps=args.steps, seed=args.eval_seed,
                               progress=not args.no_progress)
    text = json.dumps(scores, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def _evaluate(args, model) -> int:
    from .bundle import EvaluationRunner

    vqa = []
    for spec in args.vqa:
        if "=" not in spec:
            raise ValueError(f"--vqa takes FORMAT=PATH, got {spec!r}")
        fmt, path = spec.split("=", 1)
        vqa.append({"format": fmt, "path": path, "name": fmt})
    results = EvaluationRunner(model, str(args.out), vqa=vqa, reports=args.reports, editing=args.editing,
                               text_to_image=args.t2i, fid_extractor=args.fid_extractor, data_dir=args.data_dir,
                               limit=args.limit, num_inference_steps=args.steps, progress=not args.no_progress).run()
    print((args.out / "results.md").read_text())
    print(f"wrote {', '.join(results['files'].values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .training.launch import run

        return run(args)
    if args.command == "phantoms":
        return _phantoms(args)
    if args.command == "serve":
        import os

        from .server.app import serve

        try:
            serve(str(args.ckpt) if args.ckpt else None, args.host, args.port,
                  args.token or os.environ.get("UNIMEDVL_TOKEN"), args.device, args.dtype)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = _load(args)
        if args.command == "info":
            print(model)
            print(json.dumps(model.config.to_dict(), indent=2))
            return 0
        handlers = {"vqa": _text_task, "report": _text_task, "generate": _generate, "demo": _demo,
                    "phantom-eval": _phantom_eval, "evaluate": _evaluate}
        return handlers.get(args.command, _image_task)(args, model)
    except (ImageReadError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

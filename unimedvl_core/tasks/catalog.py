"""The built-in tasks: what UniMedVL reads (VQA, reports) and makes (text-to-image, image-to-image).

Defaults are the released scripts' settings (docs/sampling.md#defaults): 49 velocity evaluations (the
published 50-timestep schedule) for every image task, greedy decoding of at most 512 tokens for text.
"""

from __future__ import annotations

import torch

from ..inference.image_generation import EDITING_GUIDANCE, TEXT_TO_IMAGE_GUIDANCE, GuidanceSettings
from ..inference.prompts import report_prompt
from ..inference.sampling import RENORM_TYPES
from ..inference.text_generation import DECODING, EXPLANATION_TOKENS
from ..inference.tiling import DEFAULT_TILE_OVERLAP, TILED, TILING_MODES, WHOLE
from ..io.medical_io import read_image, read_key_slices
from .params import Param
from .registry import Applicability, Batching, RunOptions, Task, TaskRegistry, TaskResult

__all__ = ["TASKS", "MAX_STEPS", "MAX_NEW_TOKENS", "MAX_TEXT_CHARS", "MAX_KEY_SLICES", "TASK_TILING",
           "task_generator"]

MAX_STEPS = 200
MAX_NEW_TOKENS = 2048
MAX_TEXT_CHARS = 4000
# A series report reads this many key slices by default, at most MAX_KEY_SLICES (each adds its ViT tokens
# to the context).
DEFAULT_KEY_SLICES, MAX_KEY_SLICES = 5, 16
GUIDANCE_NAMES = tuple(GuidanceSettings.__dataclass_fields__)


def task_generator(seed: int) -> torch.Generator:
    """The random source of a task run: a CPU generator seeded with the task's ``seed`` on every surface, so
    the same seed gives the same output everywhere."""
    return torch.Generator().manual_seed(seed)


SEED = Param("seed", "int", 0, "random seed of the initial noise (and of sampling, for text)", minimum=0,
             maximum=2**63 - 1)


def _text(name: str, help: str, required: bool = True, plural: str | None = None, default=None) -> Param:
    return Param(name, "str", default, help, required=required, max_length=MAX_TEXT_CHARS, plural=plural)


def _decoding_params() -> tuple[Param, ...]:
    d = DECODING
    return (
        Param("max_new_tokens", "int", d.max_new_tokens, "most tokens to generate", minimum=1, maximum=MAX_NEW_TOKENS),
        Param("do_sample", "bool", d.do_sample, "sample instead of greedy decoding", flags=("--sample",)),
        Param("temperature", "float", d.temperature, "sampling temperature", minimum=0, exclusive_minimum=True,
              maximum=10),
        Param("top_p", "float", d.top_p, "nucleus sampling mass", minimum=0, exclusive_minimum=True, maximum=1),
        SEED,
    )


def _guidance_params(g: GuidanceSettings) -> tuple[Param, ...]:
    return (
        Param("num_inference_steps", "int", g.num_inference_steps,
              "velocity evaluations (49 = the published 50-timestep schedule)", minimum=1, maximum=MAX_STEPS,
              flags=("--steps",)),
        Param("cfg_text_scale", "float", g.cfg_text_scale, "text guidance scale (<= 1: off)", minimum=0, maximum=30,
              flags=("--cfg-text",)),
        Param("cfg_img_scale", "float", g.cfg_img_scale, "image guidance scale (<= 1: off)", minimum=0, maximum=30,
              flags=("--cfg-img",)),
        Param("cfg_interval", "interval", g.cfg_interval, "flow times (START, END] where guidance applies"),
        Param("timestep_shift", "float", g.timestep_shift, "schedule shift s: t -> s*t / (1 + (s-1)*t)",
              minimum=0, exclusive_minimum=True, maximum=20),
        Param("cfg_renorm_type", "str", g.cfg_renorm_type, "how guided velocities are renormalised",
              choices=RENORM_TYPES, flags=("--renorm",)),
        Param("cfg_renorm_min", "float", g.cfg_renorm_min, "lower bound of the renormalisation factor", minimum=0,
              maximum=1, flags=("--renorm-min",)),
        SEED,
    )


def _size_params() -> tuple[Param, ...]:
    return (Param("height", "int", None, "output height (default: the model's size, or the input's)",
                  limit="image_side"),
            Param("width", "int", None, "output width (default: the model's size, or the input's)",
                  limit="image_side"))


def _editing_params() -> tuple[Param, ...]:
    return (*_guidance_params(EDITING_GUIDANCE),
            Param("vae_posterior", "str", "mean", "encode the input with the posterior mean or a sample "
                  "(the reference samples; docs/deviations.md)", choices=("mean", "sample")),
            Param("analyze_first", "bool", False, "let the model describe an editing strategy first and append it "
                  "to the instruction"))


# How each image-to-image task handles an input the model does not make in one go (docs/tiling.md): tiles
# for the local, pixel-aligned tasks; the whole image (resized to the model's size and back) where the
# edit needs global context.
TASK_TILING = {"edit": WHOLE, "super_resolution": TILED, "virtual_staining": TILED, "contrast_translation": TILED,
               "counterfactual": WHOLE}


def _tiling_params(task: str) -> tuple[Param, ...]:
    return (Param("tiling", "str", TASK_TILING[task], "inputs larger than the model's side: 'tiled' (overlapping "
                  "model-sized tiles, blended) or 'whole' (resized to the model's size and back)",
                  choices=TILING_MODES),
            Param("tile_overlap", "float", DEFAULT_TILE_OVERLAP, "fraction of the tile side neighbouring tiles "
                  "share", minimum=0, maximum=0.5))


def _series_params() -> tuple[Param, ...]:
    return (Param("series_report", "bool", False, "one report for the whole series from key slices read together "
                  "in one context (the released model was trained on single images; docs/prompts.md#series-reports)"),
            Param("key_slices", "int", DEFAULT_KEY_SLICES, "how many evenly spaced slices a series report reads",
                  minimum=1, maximum=MAX_KEY_SLICES))


def _decoding(p: dict, options: RunOptions) -> dict:
    return dict(max_new_tokens=p["max_new_tokens"], do_sample=p["do_sample"], temperature=p["temperature"],
                top_p=p["top_p"], generator=task_generator(p["seed"]), streamer=options.streamer)


def _generation(p: dict, options: RunOptions) -> dict:
    kwargs = {name: p[name] for name in GUIDANCE_NAMES}
    kwargs.update(generator=task_generator(p["seed"]), progress=options.progress, callback=options.callback)
    return kwargs


def _editing(p: dict, options: RunOptions) -> dict:
    return dict(_generation(p, options), vae_posterior=p["vae_posterior"], analyze_first=p["analyze_first"],
                tiling=p["tiling"], tile_overlap=p["tile_overlap"])


def run_vqa(model, image, p: dict, options: RunOptions) -> TaskResult:
    return TaskResult("vqa", text=model.answer(image, p["question"], **_decoding(p, options)))


def run_report(model, image, p: dict, options: RunOptions) -> TaskResult:
    prompt, modality = p["prompt"], getattr(image, "modality", None)
    if p["series_report"]:  # key slices of the volume in one context: one report for the series
        image = read_key_slices(image, p["key_slices"])
        modality = image[0].modality
        prompt = prompt or report_prompt(modality)
    text = model.generate_report(image, prompt=prompt, modality=modality, **_decoding(p, options))
    return TaskResult("report", text=text)


def run_text_to_image(model, image, p: dict, options: RunOptions) -> TaskResult:
    out = model.generate_image(p["prompt"], height=p["height"], width=p["width"], **_generation(p, options))
    return TaskResult("text_to_image", image=out)


def run_edit(model, image, p: dict, options: RunOptions) -> TaskResult:
    out = model.edit_image(image, p["instruction"], height=p["height"], width=p["width"], **_editing(p, options))
    return TaskResult("edit", image=out)


def run_super_resolution(model, image, p: dict, options: RunOptions) -> TaskResult:
    out = model.super_resolve(image, scale=p["scale"], instruction=p["instruction"], **_editing(p, options))
    return TaskResult("super_resolution", image=out)


def run_virtual_staining(model, image, p: dict, options: RunOptions) -> TaskResult:
    out = model.virtual_stain(image, stain=p["stain"], instruction=p["instruction"], **_editing(p, options))
    return TaskResult("virtual_staining", image=out)


def run_contrast_translation(model, image, p: dict, options: RunOptions) -> TaskResult:
    out = model.translate_contrast(image, source=p["source"], target=p["target"], instruction=p["instruction"],
                                   **_editing(p, options))
    return TaskResult("contrast_translation", image=out)


def run_counterfactual(model, image, p: dict, options: RunOptions) -> TaskResult:
    out = model.counterfactual_edit(image, p["instruction"], max_explanation_tokens=p["max_explanation_tokens"],
                                    **_editing(p, options))
    return TaskResult("counterfactual", text=out.explanation, image=out.image)


def run_text_to_image_batch(model, images, params: list[dict], options: RunOptions) -> list[TaskResult]:
    """Requests differing only in prompt and seed: one image each, each from its own seed's generator."""
    first = params[0]
    kwargs = _generation(first, options)
    kwargs["generator"] = [task_generator(p["seed"]) for p in params]
    out = model.generate_image([p["prompt"] for p in params], height=first["height"], width=first["width"], **kwargs)
    return [TaskResult("text_to_image", image=image) for image in out]


def _editing_batch(params: list[dict], options: RunOptions) -> dict:
    """The shared editing arguments of requests that differ only in what ``Batching.per_request`` names,
    each request drawing its noise from its own seed."""
    return dict(_editing(params[0], options), generator=[task_generator(p["seed"]) for p in params])


def run_edit_batch(model, images, params: list[dict], options: RunOptions) -> list[TaskResult]:
    out = model.edit_image(list(images), [p["instruction"] for p in params], height=params[0]["height"],
                           width=params[0]["width"], **_editing_batch(params, options))
    return [TaskResult("edit", image=image) for image in out]


def run_super_resolution_batch(model, images, params: list[dict], options: RunOptions) -> list[TaskResult]:
    first = params[0]
    out = model.super_resolve(list(images), scale=first["scale"], instruction=first["instruction"],
                              **_editing_batch(params, options))
    return [TaskResult("super_resolution", image=image) for image in out]


def run_virtual_staining_batch(model, images, params: list[dict], options: RunOptions) -> list[TaskResult]:
    first = params[0]
    out = model.virtual_stain(list(images), stain=first["stain"], instruction=first["instruction"],
                              **_editing_batch(params, options))
    return [TaskResult("virtual_staining", image=image) for image in out]


def run_contrast_translation_batch(model, images, params: list[dict], options: RunOptions) -> list[TaskResult]:
    first = params[0]
    out = model.translate_contrast(list(images), source=first["source"], target=first["target"],
                                   instruction=first["instruction"], **_editing_batch(params, options))
    return [TaskResult("contrast_translation", image=image) for image in out]


def _edits_without_analysis(model, params: dict) -> bool:
    """Edits batch unless the model first describes a strategy per image (a text pass of its own)."""
    return not params.get("analyze_first")


def _answer_batch(model, images, questions: list[str], p: dict) -> list[str]:
    return model.answer_batch(images, questions, max_new_tokens=p["max_new_tokens"], do_sample=p["do_sample"],
                              temperature=p["temperature"], top_p=p["top_p"])


def run_vqa_batch(model, images, params: list[dict], options: RunOptions) -> list[TaskResult]:
    texts = _answer_batch(model, images, [p["question"] for p in params], params[0])
    return [TaskResult("vqa", text=text) for text in texts]


def run_report_batch(model, images, params: list[dict], options: RunOptions) -> list[TaskResult]:
    prompts = [p["prompt"] or report_prompt(read_image(image).modality) for p, image in zip(params, images)]
    return [TaskResult("report", text=text) for text in _answer_batch(model, images, prompts, params[0])]


def _greedy_with_batch_api(model, params: dict) -> bool:
    """Answers batch only greedily (a sampled batch would draw differently from single requests), and one
    image per request (a series report reads several)."""
    return hasattr(model, "answer_batch") and not params.get("do_sample") and not params.get("series_report")


TEXT_TO_IMAGE_BATCHING = Batching(("prompt", "seed"), run_text_to_image_batch)
VQA_BATCHING = Batching(("question", "seed"), run_vqa_batch, _greedy_with_batch_api)
REPORT_BATCHING = Batching(("prompt", "seed"), run_report_batch, _greedy_with_batch_api)
# Image-to-image requests run as one batched edit (several images per forward, grouped by output size).
EDIT_BATCHING = Batching(("instruction", "seed"), run_edit_batch, _edits_without_analysis)
SUPER_RESOLUTION_BATCHING = Batching(("seed",), run_super_resolution_batch, _edits_without_analysis)
STAINING_BATCHING = Batching(("seed",), run_virtual_staining_batch, _edits_without_analysis)
TRANSLATION_BATCHING = Batching(("seed",), run_contrast_translation_batch, _edits_without_analysis)

# Where each image task applies by default in study runs (the MAP; a task file may change it): super-
# resolution for cross-sectional slices of at most 512 px (radiographs and mammograms are already 2000+ px),
# staining for pathology, contrast translation for MR, counterfactual edits for radiographs. Inputs without a
# modality (PNG, NIfTI) pass the modality rule.
SUPER_RESOLUTION_APPLIES = Applicability(("CT", "MR", "PT", "NM", "US", "OT", "SC"), max_side=512)
STAINING_APPLIES = Applicability(("SM", "OT", "XC", "GM", "SC"))
TRANSLATION_APPLIES = Applicability(("MR",))
COUNTERFACTUAL_APPLIES = Applicability(("CR", "DX", "DR", "RG"))

_OVERRIDE = "override the task's instruction"


def _builtin_tasks() -> list[Task]:
    return [
        Task("vqa", "answer a question about an image", "image", "text",
             (_text("question", "the question", plural="questions"), *_decoding_params()), run_vqa,
             batching=VQA_BATCHING,
             examples=('unimedvl vqa --image chest.dcm --question "Is there a pleural effusion?"',)),
        Task("report", "draft a report for an image, or one report for a series", "image", "text",
             (_text("prompt", "override the report prompt", required=False), *_series_params(), *_decoding_params()),
             run_report, batching=REPORT_BATCHING,
             examples=("unimedvl report --image ct_series/ --window lung",
                       "unimedvl report --image ct_series/ --series-report --key-slices 6")),
        Task("text_to_image", "generate an image from a description", "text", "image",
             (_text("prompt", "what to generate", plural="prompts"), *_size_params(),
              *_guidance_params(TEXT_TO_IMAGE_GUIDANCE)), run_text_to_image, aliases=("generate",),
             batching=TEXT_TO_IMAGE_BATCHING,
             examples=('unimedvl text_to_image --prompt "CT image with two lesions." --out ct.png',)),
        Task("edit", "image-to-image from an instruction", "image", "image",
             (_text("instruction", "what to change"), *_size_params(), *_editing_params(), *_tiling_params("edit")),
             run_edit, batching=EDIT_BATCHING,
             examples=('unimedvl edit --image t2.nii.gz --instruction "..." --out out.png',)),
        Task("super_resolution", "x2/x4 super-resolution", "image", "image",
             (Param("scale", "int", 4, "upscaling factor", choices=(2, 4)), _text("instruction", _OVERRIDE, False),
              *_editing_params(), *_tiling_params("super_resolution")), run_super_resolution,
             applies=SUPER_RESOLUTION_APPLIES, batching=SUPER_RESOLUTION_BATCHING,
             examples=("unimedvl super_resolution --image lowres.png --scale 4 --out sr.png",)),
        Task("virtual_staining", "virtual staining of an H&E pathology image", "image", "image",
             (Param("stain", "str", "IHC", "the target stain", max_length=40), _text("instruction", _OVERRIDE, False),
              *_editing_params(), *_tiling_params("virtual_staining")), run_virtual_staining, aliases=("stain",),
             applies=STAINING_APPLIES, batching=STAINING_BATCHING,
             examples=("unimedvl virtual_staining --image he_patch.png --out ihc.png",)),
        Task("contrast_translation", "MRI contrast translation (e.g. T2 to FLAIR)", "image", "image",
             (Param("source", "str", "T2", "the input's contrast", max_length=40),
              Param("target", "str", "FLAIR", "the contrast to make", max_length=40),
              _text("instruction", _OVERRIDE, False), *_editing_params(), *_tiling_params("contrast_translation")),
             run_contrast_translation,
             aliases=("translate",), applies=TRANSLATION_APPLIES, batching=TRANSLATION_BATCHING,
             examples=("unimedvl contrast_translation --image t2.dcm --source T2 --target FLAIR --out flair.png",)),
        Task("counterfactual", "a counterfactual edit and the model's explanation", "image", "image",
             (_text("instruction", "the counterfactual change"),
              Param("max_explanation_tokens", "int", EXPLANATION_TOKENS, "most tokens of the explanation",
                    minimum=1, maximum=MAX_NEW_TOKENS), *_editing_params(), *_tiling_params("counterfactual")),
             run_counterfactual,
             applies=COUNTERFACTUAL_APPLIES,
             examples=('unimedvl counterfactual --image cxr.dcm --instruction "Remove the effusion." --out cf.png',)),
    ]


TASKS = TaskRegistry(_builtin_tasks())

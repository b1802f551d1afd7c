"""Every prompt string the model is given, in one place (the released ones are explained in docs/prompts.md).

Training data preparation imports these too, so a model trained by our pipeline and the task API speak
the same instructions.
"""

from __future__ import annotations

__all__ = ["REPORT_PROMPT", "SUPER_RESOLUTION", "VIRTUAL_STAINING", "CONTRAST_TRANSLATION", "COUNTERFACTUAL",
           "EDIT_ANALYSIS", "EDIT_ANALYSIS_JOINER", "THINK_UNDERSTANDING", "THINK_GENERATION", "TEXT_TO_IMAGE",
           "report_prompt", "super_resolution_instruction", "staining_instruction", "translation_instruction",
           "text_to_image_prompt", "MULTIPLE_CHOICE", "multiple_choice_prompt"]

REPORT_PROMPT = "Write a radiology report for this image, with findings and an impression."
REPORT_PROMPT_WITH_MODALITY = "Write a radiology report for this {modality} image, with findings and an impression."

SUPER_RESOLUTION = "Increase the resolution of this {modality} image by {scale}x, restoring fine detail."
VIRTUAL_STAINING = "Convert this H&E stained pathology image into the corresponding {stain} stained image."
CONTRAST_TRANSLATION = "Translate this {source} MRI image into the corresponding {target} image."
COUNTERFACTUAL = "{instruction}"
# Text-to-image prompts: "<modality> image with <description>", e.g. "CT image with two lesions."
TEXT_TO_IMAGE = "{modality} image with {description}"

# The editing script's optional describe-first pass, and how its answer is appended to the instruction.
EDIT_ANALYSIS = "Analyze this medical image and develop an editing strategy for: '{instruction}'."
EDIT_ANALYSIS_JOINER = "\n\n"

# UniMedVL's think-mode system prompts (docs/prompts.md#think-mode).
THINK_UNDERSTANDING = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer.\n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here"
)
THINK_GENERATION = (
    "You should first think about the planning process in your mind, and then generate the image.\n"
    "The planning process is enclosed within <think> </think> tags; that is, <think> planning process here "
    "</think> image here.\n"
)


MULTIPLE_CHOICE = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."


def multiple_choice_prompt(question: str, options: dict[str, str]) -> str:
    return MULTIPLE_CHOICE.format(question=question, options="\n".join(f"{k}. {v}" for k, v in options.items()))


def report_prompt(modality: str | None = None) -> str:
    return REPORT_PROMPT_WITH_MODALITY.format(modality=modality) if modality else REPORT_PROMPT


def super_resolution_instruction(scale: int, modality: str | None = None) -> str:
    return SUPER_RESOLUTION.format(scale=scale, modality=modality or "medical")


def staining_instruction(stain: str = "IHC") -> str:
    return VIRTUAL_STAINING.format(stain=stain)


def translation_instruction(source: str, target: str) -> str:
    return CONTRAST_TRANSLATION.format(source=source, target=target)


def text_to_image_prompt(modality: str, description: str) -> str:
    return TEXT_TO_IMAGE.format(modality=modality, description=description)

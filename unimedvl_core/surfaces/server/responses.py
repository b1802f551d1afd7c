"""What the server answers: a pydantic model for every JSON response (so ``/openapi.json`` documents each 200)
and the media types of the binary ones (a PNG route says ``image/png``, not an empty JSON schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Health", "Weights", "Limits", "Info", "ParamDoc", "TaskDoc", "TasksDocument", "Answer", "Report",
           "TaskText", "IMAGE_MEDIA", "image_responses", "NOTICE_FIELD"]

NOTICE_FIELD = Field(None, description="the demonstration-model notice: set when the embedded phantom-trained "
                                       "model answered (its outputs are not interpretations of real images)")


class Health(BaseModel):
    status: str = Field(description="ok, or starting while the model loads")


class Weights(BaseModel):
    """The weights behind every output (``Provenance``)."""

    name: str
    weights_file: str | None
    demo: bool
    sha256: str | None
    notice: str | None = NOTICE_FIELD


class Limits(BaseModel):
    model_config = ConfigDict(extra="allow")

    max_image_side: int
    size_multiple: int
    default_size: list[int]
    max_image_pixels: int
    max_upload_bytes: int
    max_queue: int
    request_timeout: float
    max_images_per_request: int


class Info(BaseModel):
    name: str
    version: str
    model: str
    model_id: str = Field(description="the id /v1/models lists and OpenAI-compatible requests name")
    weights: Weights
    device: str
    dtype: str
    default_size: list[int]
    max_image_side: int
    size_multiple: int
    tasks: list[str]
    image_to_image: list[str]
    limits: Limits
    synthetic_label: str


class ParamDoc(BaseModel):
    """One task parameter as the registry describes it (``Param.describe``)."""

    name: str
    type: str
    default: Any
    required: bool
    help: str
    choices: list[Any] | None = None
    minimum: int | float | None = None  # int first: a seed's bound (2**63 - 1) must stay exact
    maximum: int | float | None = None
    exclusive_minimum: bool | None = None
    max_length: int | None = None
    limit: str | None = None
    plural: str | None = None


class TaskDoc(BaseModel):
    name: str
    summary: str
    takes: str
    returns: str
    aliases: list[str]
    params: list[ParamDoc]
    applies_to: dict[str, Any]
    examples: list[str]


class ModelLimits(BaseModel):
    max_image_side: int
    size_multiple: int
    default_size: list[int]


class TasksDocument(BaseModel):
    tasks: list[TaskDoc]
    limits: ModelLimits | None = None


class Answer(BaseModel):
    answer: str
    notice: str | None = NOTICE_FIELD


class Report(BaseModel):
    report: str
    notice: str | None = NOTICE_FIELD


class TaskText(BaseModel):
    """A task's text result (an image result comes as the image instead)."""

    task: str
    text: str | None
    image: None = None
    notice: str | None = NOTICE_FIELD


IMAGE_MEDIA = {"image/png": "PNG with the synthetic labels in text chunks (output=png, the default)",
               "application/x-npy": "NumPy .npy, uint8 HxWx3 (output=npy)",
               "application/dicom": "a DICOM object in the input's study, SyntheticData YES (output=dicom)"}
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def image_responses(media: tuple[str, ...] = tuple(IMAGE_MEDIA)) -> dict:
    """``responses=`` of a route answering with an image (its ``response_model``, if any, is the JSON of a
    text-only result)."""
    content: dict[str, Any] = {m: _BINARY for m in media}
    described = "; ".join(f"{m}: {IMAGE_MEDIA[m]}" for m in media)
    return {200: {"content": content, "description": f"the generated image, labelled synthetic ({described}); "
                                                     "headers X-UniMedVL-Synthetic, -Task, -Weights, -Notice"}}

"""The OpenAI-compatible API's request and response bodies (the subset UniMedVL serves; docs/serving.md).

Fields keep OpenAI's names and meanings so that the official clients work unchanged. Bounds of the decoding
and generation values are the task registry's, checked when a request is resolved; extension fields
(``seed``, the registry's generation parameters, ``notice``, ``weights``) are documented in docs/serving.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .responses import NOTICE_FIELD

__all__ = ["ImageURL", "TextPart", "ImagePart", "ChatMessage", "ChatRequest", "ChatChoice", "ChatCompletion",
           "ChunkDelta", "ChunkChoice", "ChatChunk", "ModelCard", "ModelList", "ImageData", "ImagesResponse",
           "ErrorBody", "ErrorResponse", "IMAGE_SIZE_PATTERN"]

# A conversation is prefilled whole into one KV cache: bound it before it is queued (the model also refuses
# a conversation longer than its context).
MAX_MESSAGES = 128
IMAGE_SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an option we do not serve is a 400 naming it, not ignored


class ImageURL(_Request):
    url: str = Field(description="a data: URL (data:image/png;base64,...; DICOM as data:application/dicom;...) "
                                 "or, when the server allows it (--allow-local-images DIR), a path under DIR")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted and ignored")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] = Field(description="text, or parts: text and (user turns) image_url; "
                                                         "a turn's images come before its text in the context")
    name: str | None = Field(None, description="accepted and ignored")


class StreamOptions(_Request):
    include_usage: bool | None = None


class ChatRequest(_Request):
    model: str = Field(description="the served model id (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES,
                                        description=f"the conversation, at most {MAX_MESSAGES} messages")
    max_tokens: int | None = Field(None, description="most tokens to generate (registry: vqa max_new_tokens)")
    max_completion_tokens: int | None = Field(None, description="the same as max_tokens (newer clients)")
    temperature: float | None = Field(None, description="> 0 samples at this temperature; 0 or unset decodes "
                                                        "greedily, as the released scripts do")
    top_p: float | None = Field(None, description="nucleus mass; set without temperature, samples at 1.0")
    seed: int | None = Field(None, ge=0, description="random seed of sampling")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: str | None = Field(None, description="accepted and ignored")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens the model read before answering: text blocks, image blocks "
                                           "(ViT patch tokens and markers) and the answer's start token")
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    weights: str = Field(description="the weights that answered (name, file and SHA-256)")
    notice: str | None = NOTICE_FIELD


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatChunk(BaseModel):
    """One server-sent event of a streamed completion; the stream ends with ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    notice: str | None = NOTICE_FIELD


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ImageData(BaseModel):
    b64_json: str = Field(description="a PNG, labelled synthetic in its text chunks")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    task: str = Field(description="the registry task that made the images")
    explanation: str | None = Field(None, description="the model's explanation (counterfactual)")
    synthetic: Literal[True] = Field(True, description="every image is AI-generated, not acquired from a patient")
    weights: str
    notice: str | None = NOTICE_FIELD


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, which its clients read the message from."""

    error: ErrorBody

"""OpenAI-compatible reading: ``GET /v1/models`` (the one served model) and ``POST /v1/chat/completions``
(multi-turn, images as ``image_url`` parts, ``stream=true`` as ``chat.completion.chunk`` events ending with
``data: [DONE]``). Decoding bounds are the registry's ``vqa`` parameters (docs/serving.md#openai-compatible-routes)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from ....inference.understanding import vit_input, vit_token_count
from ....modeling.layout import TokenLayout
from ....tasks.catalog import task_generator
from ....tasks.params import TaskParameterError
from ....tasks.registry import Task
from ..chat_messages import to_turns
from ..dependencies import RegistryDep, Runner, RunnerDep, ServedIdDep, SettingsDep, authorized
from ..openai_errors import OpenAIHTTPError
from ..openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatCompletion,
    ChatRequest,
    ChunkChoice,
    ChunkDelta,
    ModelCard,
    ModelList,
    Usage,
)
from ..streaming import stream_job

__all__ = ["router", "check_model"]

router = APIRouter(dependencies=[Depends(authorized)], tags=["openai"])
_STARTED = int(time.time())
_EVENTS = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                 "description": "a chat.completion, or with stream=true chat.completion.chunk events and [DONE]"}}


def check_model(requested: str | None, served: str) -> None:
    """Requests must name the served model (or, where OpenAI makes ``model`` optional, none)."""
    if requested is not None and requested != served:
        raise OpenAIHTTPError(404, f"model {requested!r} is not served here; this server serves {served!r} "
                                   "(GET /v1/models)", "model", "model_not_found")


@router.get("/v1/models", response_model=ModelList)
def list_models(served: ServedIdDep) -> ModelList:
    """The one model this server serves."""
    return ModelList(data=[ModelCard(id=served, created=_STARTED, owned_by="unimedvl")])


@router.get("/v1/models/{model:path}", response_model=ModelCard)
def get_model(model: str, served: ServedIdDep) -> ModelCard:
    check_model(model, served)
    return ModelCard(id=served, created=_STARTED, owned_by="unimedvl")


def _decoding(req: ChatRequest, vqa: Task) -> dict:
    """OpenAI's decoding fields as ``chat`` arguments, within the registry's bounds: greedy unless a
    temperature > 0 (or only ``top_p``) is given."""
    sample = req.temperature > 0 if req.temperature is not None else req.top_p is not None
    values = {"max_new_tokens": req.max_completion_tokens or req.max_tokens, "do_sample": sample,
              "temperature": req.temperature if sample and req.temperature else None, "top_p": req.top_p,
              "seed": req.seed}
    names = {"max_new_tokens": "max_tokens"}
    out = {}
    for name, value in values.items():
        param = vqa.param(name)
        try:
            out[name] = param.parse(param.default if value is None else value)
        except TaskParameterError as err:
            field = names.get(name, name)
            raise OpenAIHTTPError(400, f"{field}: {str(err).split(': ', 1)[-1]}", field) from None
    out["generator"] = task_generator(out.pop("seed"))
    return out


def _prompt_tokens(model: Any, turns: list[dict]) -> int:
    """The tokens ``chat`` prefills: every turn's text block, every image's ViT block (its patch tokens at
    the size the model reads it, and the vision markers) and the start token of the answer, laid out by
    ``TokenLayout`` as the conversation's context is (docs/token-layout.md#conversations)."""
    rule = model.config.transforms.vqa_vit
    texts = [len(model.encode_text(t["content"])) for t in turns]
    images = [vit_token_count(model, vit_input(image, rule)) for t in turns for image in t["images"]]
    return TokenLayout.planned_length(text=texts, images=images, extra=1)


def _usage(runner: Runner, turns: list[dict], completion: int) -> Usage:
    prompt = _prompt_tokens(runner.model, turns)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_EVENTS)
def chat_completions(req: ChatRequest, runner: RunnerDep, registry: RegistryDep, settings: SettingsDep,
                     served: ServedIdDep):
    """Answer the last user message with every earlier turn in the context (``UniMedVL.chat``)."""
    check_model(req.model, served)
    vqa = registry.get("vqa", warn=False)
    turns, decoding = to_turns(req.messages, settings, vqa), _decoding(req, vqa)

    def make_fn(streamer):
        return lambda job: runner.model.chat(turns, return_dict=True, streamer=streamer, **decoding)

    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        pieces = stream_job(runner, "chat", make_fn)
        head = ChatChunk(id=reply_id, created=created, model=served, choices=[], notice=runner.notice)
        return StreamingResponse(_chunks(pieces, head, runner, turns if include_usage else None),
                                 media_type="text/event-stream")
    out = runner.wait(runner.submit_call("chat", make_fn(None)))
    choice = ChatChoice(index=0, message=AssistantMessage(content=out.text), finish_reason=_finish(out))
    return ChatCompletion(id=reply_id, created=created, model=served, choices=[choice],
                          usage=_usage(runner, turns, len(out.token_ids)), weights=runner.model.provenance.short,
                          notice=runner.notice)


def _finish(out: Any) -> str:
    return "stop" if out.stopped_by == "stop_token" else "length"


def _event(chunk: ChatChunk | dict) -> str:
    data = chunk.model_dump_json(exclude_none=True) if isinstance(chunk, ChatChunk) else json.dumps(chunk)
    return f"data: {data}\n\n"


def _chunks(pieces: Iterator[tuple[str, Any]], head: ChatChunk, runner: Runner,
            turns: list[dict] | None) -> Iterator[str]:
    """The role first (with the notice, once), then one chunk per decoded piece, the finish reason, usage when
    asked for, and ``[DONE]``; a failure mid-stream is an ``error`` event (OpenAI's clients raise it)."""
    yield _event(head.model_copy(update={"choices": [ChunkChoice(delta=ChunkDelta(role="assistant", content=""))]}))
    blank = head.model_copy(update={"notice": None})
    for kind, value in pieces:
        if kind == "token":
            yield _event(blank.model_copy(update={"choices": [ChunkChoice(delta=ChunkDelta(content=value))]}))
        elif kind == "done":
            yield _event(blank.model_copy(update={"choices": [ChunkChoice(delta=ChunkDelta(),
                                                                          finish_reason=_finish(value))]}))
            if turns is not None:
                yield _event(blank.model_copy(update={"usage": _usage(runner, turns, len(value.token_ids))}))
        else:
            yield _event({"error": {"message": value, "type": "server_error"}})
            return
    yield "data: [DONE]\n\n"

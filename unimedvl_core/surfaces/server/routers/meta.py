"""Liveness, server information and the task registry document."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .... import __version__
from ....tasks.registry import ModelLimits
from ..dependencies import ModelDep, RegistryDep, ServedIdDep, SettingsDep, authorized
from ..responses import Health, Info, TasksDocument
from ..schemas import image_to_image_tasks

__all__ = ["router"]

router = APIRouter()


@router.get("/health", response_model=Health)
def health(request: Request) -> dict:
    """Liveness; needs no token so that load balancers and the Slicer module can probe it."""
    return {"status": "ok" if getattr(request.app.state, "worker", None) is not None else "starting"}


@router.get("/info", dependencies=[Depends(authorized)], response_model=Info)
def info(model: ModelDep, registry: RegistryDep, settings: SettingsDep, served: ServedIdDep) -> dict:
    """The model, its size limits, the server's limits and the registry's task names."""
    limits = {**ModelLimits.of(model.config).describe(), "max_image_pixels": settings.max_image_pixels,
              "max_upload_bytes": settings.max_upload_bytes, "max_queue": settings.max_queue,
              "request_timeout": settings.request_timeout, "max_images_per_request": settings.max_images_per_request}
    return {"name": "UniMedVL", "version": __version__, "model": model.name, "model_id": served,
            "weights": model.provenance.to_dict(), "device": str(model.device),
            "dtype": str(model.dtype).replace("torch.", ""), "default_size": limits["default_size"],
            "max_image_side": limits["max_image_side"], "size_multiple": limits["size_multiple"],
            "tasks": registry.names(), "image_to_image": [t.name for t in image_to_image_tasks(registry)],
            "limits": limits, "synthetic_label": "X-UniMedVL-Synthetic: YES"}


@router.get("/v1/tasks", dependencies=[Depends(authorized)], response_model=TasksDocument,
            response_model_exclude_unset=True)
def tasks(model: ModelDep, registry: RegistryDep) -> dict:
    """Every task with its parameters, defaults and limits for this checkpoint: the document
    ``unimedvl tasks --json --ckpt DIR`` prints."""
    return registry.describe(ModelLimits.of(model.config))

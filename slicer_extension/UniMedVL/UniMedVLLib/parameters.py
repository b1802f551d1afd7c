"""Every GUI setting of the module, declared once: the parameter node class (Slicer's ``parameterNodeWrapper``)
is built from this table in UniMedVL.py, and the widgets of UniMedVL.ui name their setting in the
``SlicerParameterName`` property, so that the settings are saved with the scene, restored when it is
loaded and back to their defaults after the scene is closed.

Not a setting: the server token (a scene file is no place for a credential; it stays in the widget only).
Two combo boxes take their items from the backend's task registry (task names, super-resolution scales), so
the module fills them and keeps their setting itself (``MANUAL_WIDGETS``); the conversation has no widget.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Annotated, Any

__all__ = ["Setting", "SETTINGS", "MANUAL_WIDGETS", "UNSAVED_WIDGETS", "BACKENDS", "MODALITIES", "DEFAULT_URL",
           "parameter_node_class", "checkpoint_folder"]

DEFAULT_URL = "http://127.0.0.1:8765"
BACKENDS = ("UniMedVL server", "this computer")
MODALITIES = ("(none)", "CT", "T1-weighted MRI", "T2-weighted MRI", "chest X-ray", "H&E pathology", "IHC pathology")
INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Setting:
    """One setting: its name in the parameter node, its kind, default and bounds, and its widget."""

    name: str
    kind: str  # "node" (a volume), "bool", "int", "float", "str", "path" or "choice"
    default: Any
    widget: str | None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None


SETTINGS = (
    Setting("inputVolume", "node", None, "volumeSelector"),
    Setting("useViewSlice", "bool", True, "useViewSliceCheck"),
    Setting("sliceIndex", "int", 0, "sliceSpin", 0, INT_MAX),  # bounded by the volume's slices at run time
    Setting("backend", "choice", BACKENDS[0], "backendCombo", choices=BACKENDS),
    Setting("serverUrl", "str", DEFAULT_URL, "serverUrlEdit"),
    Setting("checkpoint", "path", pathlib.Path(""), "checkpointPath"),
    Setting("question", "str", "", "questionEdit"),
    Setting("prompt", "str", "", "promptEdit"),
    Setting("modality", "choice", MODALITIES[0], "modalityCombo", choices=MODALITIES),
    # sizes, steps and guidance: bounded (and defaulted) by the backend's task registry once connected
    Setting("height", "int", 256, "heightSpin", 16, 4096),
    Setting("width", "int", 256, "widthSpin", 16, 4096),
    Setting("steps", "int", 49, "stepsSpin", 1, 1000),
    Setting("guidance", "float", 4.0, "guidanceSpin", 0.0, 100.0),
    Setting("seed", "int", 0, "seedSpin", 0, INT_MAX),
    Setting("task", "str", "super_resolution", None),
    Setting("instruction", "str", "", "instructionEdit"),
    Setting("scale", "int", 4, None),
    Setting("conversation", "str", "", None),
)
# widgets the module keeps in step with a setting itself: their items come from the task registry
MANUAL_WIDGETS = {"taskCombo": "task", "scaleCombo": "scale"}
# input widgets deliberately not saved with the scene
UNSAVED_WIDGETS = {"tokenEdit"}


def _annotation(setting: Setting, validators, slicer_module):
    base = {"node": getattr(slicer_module, "vtkMRMLScalarVolumeNode", None), "bool": bool, "int": int,
            "float": float, "str": str, "path": pathlib.Path, "choice": str}[setting.kind]
    extras = []
    if setting.choices is not None:
        extras.append(validators.Choice(list(setting.choices)))
    if setting.minimum is not None:
        extras.append(validators.WithinRange(setting.minimum, setting.maximum))
    return Annotated[(base, *extras)] if extras else base


def parameter_node_class(wrapper, validators, slicer_module):
    """The module's parameter node class: ``wrapper`` is ``slicer.parameterNodeWrapper.parameterNodeWrapper``,
    ``validators`` the module holding ``Choice`` and ``WithinRange``. A vector volume is a scalar volume
    subclass, so the volume setting takes both."""
    namespace = {"__annotations__": {s.name: _annotation(s, validators, slicer_module) for s in SETTINGS},
                 "__module__": __name__, "__doc__": "The UniMedVL module's settings, saved with the scene."}
    namespace.update({s.name: s.default for s in SETTINGS if s.kind != "node"})
    return wrapper(type("UniMedVLParameterNode", (), namespace))


def checkpoint_folder(value) -> str | None:
    """The checkpoint setting as a folder for local mode; None (the embedded model) when it is empty."""
    text = str(value or "").strip()
    return None if text in ("", ".") else text

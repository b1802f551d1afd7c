"""Task-aware residency: only the weights a task uses are held on the device (docs/quantization.md#residency).

The model is a mixture of two transformers of equal size. Understanding (VQA, reports, decoding text)
never touches the generation expert; generation runs the generation expert over the latent tokens at
every step, but the two markers of each image block still pass through the understanding expert.

With ``residency="task"`` the two experts' decoder weights (and the text head, used by understanding only)
live in host memory (pinned on CUDA) and the device holds one phase at a time:

- understanding phase: the understanding expert and the text head on the device, the generation expert not;
- generation phase: the generation expert on the device; the understanding expert is *streamed*: each
  layer's weights are copied in just before the layer runs (the next layer's copy overlaps this layer's
  compute on a side CUDA stream) and dropped after it, so at most two layers of it are on the device.

Everything else (embeddings, final norms, ViT, connector, generation heads, VAE) stays on the device.
Phases switch on demand: a forward with generation rows enters the generation phase, the text head enters
the understanding phase; a forward of understanding rows only (a prompt) runs in whatever phase is current
(streamed in the generation phase). Weights are the same tensors in every phase, so outputs are bit for bit
those of full residency. A weight that is not resident is a meta tensor: using it fails loudly.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..modeling.unimedvl import UniMedVLModel
from .decoding import forget_workspaces
from .quantization import LAYERS_PREFIX

__all__ = ["RESIDENCY_MODES", "UNDERSTANDING", "GENERATION", "TaskResidency", "check_residency",
           "is_generation_expert", "is_understanding_only", "moves_with_task"]

RESIDENCY_MODES = ("all", "task")
UNDERSTANDING, GENERATION = "understanding", "generation"
LM_HEAD_PREFIX = "language_model.lm_head."
_LAYER = re.compile(re.escape(LAYERS_PREFIX) + r"(\d+)\.")


def check_residency(mode: str) -> None:
    if mode not in RESIDENCY_MODES:
        raise ValueError(f"unknown residency {mode!r}; use one of {', '.join(RESIDENCY_MODES)}")


def is_generation_expert(name: str) -> bool:
    return name.startswith(LAYERS_PREFIX) and "_moe_gen" in name


def is_understanding_only(name: str) -> bool:
    """The understanding expert's decoder weights and the text head."""
    return (name.startswith(LAYERS_PREFIX) and "_moe_gen" not in name) or name.startswith(LM_HEAD_PREFIX)


def moves_with_task(name: str) -> bool:
    """Parameters that ``residency="task"`` keeps in host memory and brings to the device by phase."""
    return is_generation_expert(name) or is_understanding_only(name)


def _leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's data (the inner tensors of torchao's quantised subclasses)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        return [tensor]
    return [leaf for name in flatten()[0] for leaf in _leaves(getattr(tensor, name))]


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device``, asynchronously from pinned memory; torchao's tensor subclasses take no
    ``non_blocking`` argument (their copy is issued on the current stream all the same)."""
    with torch.inference_mode(False):  # tasks run in inference mode; parameters must not be inference tensors
        if type(tensor) in (torch.Tensor, nn.Parameter):
            return tensor.to(device, non_blocking=True)
        return tensor.to(device)


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A page-locked copy (asynchronous host-to-device copies need one); the tensor itself where the
    tensor type cannot be pinned."""
    try:
        return tensor.pin_memory()
    except Exception:  # noqa: BLE001 - tensor subclasses fail in their own ways; an unpinned copy still works
        return tensor


class TaskResidency:
    """Holds the task-dependent weights of ``model`` in host memory and places them on ``device`` by phase.

    Attributes: ``phase`` (None before the first forward), ``switches`` (phase changes so far), ``streamed``
    (layer copies made by streaming so far).
    """

    def __init__(self, model: UniMedVLModel, device: torch.device | str):
        self.model, self.device = model, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots, self.host, self.absent = {}, {}, {}
        self.layer_names: dict[int, list[str]] = {}
        names = [n for n, _ in model.named_parameters() if moves_with_task(n)]
        for name in names:  # one parameter at a time: never a second host copy of the whole model
            self.slots[name] = self._slot(name)
            param = self._current(name).detach()
            self.host[name] = _pinned(param.to("cpu")) if self.cuda else param
            self.absent[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                             requires_grad=False)
            self._set(name, self.absent[name])
            del param
            match = _LAYER.match(name)
            if match and is_understanding_only(name):
                self.layer_names.setdefault(int(match.group(1)), []).append(name)
        self.num_layers = len(model.language_model.model.layers)
        self.pending: dict[int, tuple[dict[str, torch.Tensor], torch.cuda.Event | None]] = {}
        self.phase: str | None = None
        self.switches = self.streamed = 0
        self._hooks = self._install_hooks()

    def _slot(self, name: str) -> tuple[nn.Module, str]:
        module_name, _, leaf = name.rpartition(".")
        return self.model.get_submodule(module_name), leaf

    def _current(self, name: str) -> torch.Tensor:
        module, leaf = self.slots[name]
        return module._parameters[leaf]

    def _set(self, name: str, value: torch.Tensor) -> None:
        module, leaf = self.slots[name]
        if not isinstance(value, nn.Parameter):
            with torch.inference_mode(False):
                value = nn.Parameter(value, requires_grad=False)
        module._parameters[leaf] = value

    def _install_hooks(self) -> list:
        lm = self.model.language_model
        hooks = [lm.model.register_forward_pre_hook(self._before_llm, with_kwargs=True),
                 lm.lm_head.register_forward_pre_hook(lambda *_: self.enter(UNDERSTANDING))]
        for index, layer in enumerate(lm.model.layers):
            hooks.append(layer.register_forward_pre_hook(lambda *_, i=index: self._before_layer(i)))
            hooks.append(layer.register_forward_hook(lambda *_, i=index: self._after_layer(i)))
        return hooks

    def remove(self) -> None:
        """Put every weight on the device (full residency) and remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._drop_pending()
        forget_workspaces(self.model)
        for name, host in self.host.items():
            self._set(name, _to(host, self.device))
        self.phase = None

    # ----- phases -----

    def resident(self) -> set[str]:
        """Names of the task-dependent parameters that are on the device now."""
        return {n for n in self.slots if not self._current(n).is_meta}

    def enter(self, phase: str) -> None:
        """Make ``phase``'s weights resident (dropping the other phase's first, so the peak is the larger
        phase, not both). A no-op in the current phase."""
        if phase == self.phase:
            return
        keep = is_understanding_only if phase == UNDERSTANDING else is_generation_expert
        self._drop_pending()
        for name in self.host:
            if not keep(name):
                self._set(name, self.absent[name])
        forget_workspaces(self.model)  # captured decode graphs hold the old weight addresses
        for name in self.host:  # on the compute stream: reuses the memory just freed; asynchronous (pinned)
            if keep(name):
                self._set(name, _to(self.host[name], self.device))
        self.phase = phase
        self.switches += 1

    def _before_llm(self, module, args, kwargs) -> None:
        routing = kwargs["routing"] if "routing" in kwargs else args[2]
        if routing.gen is not None:
            self.enter(GENERATION)
        elif self.phase is None:
            self.enter(UNDERSTANDING)

    # ----- streaming the understanding expert in the generation phase -----

    def _before_layer(self, index: int) -> None:
        if self.phase != GENERATION:
            return
        self._stream_in(index)
        tensors, event = self.pending.pop(index)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in tensors.values():
                for leaf in _leaves(tensor):
                    leaf.record_stream(current)  # allocated on the copy stream, used on this one
        for name, tensor in tensors.items():
            self._set(name, tensor)
        self._stream_in((index + 1) % self.num_layers)  # overlaps this layer's compute

    def _after_layer(self, index: int) -> None:
        if self.phase != GENERATION:
            return
        for name in self.layer_names.get(index, ()):
            self._set(name, self.absent[name])

    def _stream_in(self, index: int) -> None:
        if index in self.pending:
            return
        names = self.layer_names.get(index, [])
        if not self.cuda:
            self.pending[index] = ({n: self.host[n] for n in names}, None)
        else:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                tensors = {n: _to(self.host[n], self.device) for n in names}
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self.pending[index] = (tensors, event)
        self.streamed += 1

    def _drop_pending(self) -> None:
        if self.cuda and self.pending:
            self.copy_stream.synchronize()
        self.pending.clear()

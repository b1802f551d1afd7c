"""How a batch job uses Ray: where it runs, how many model actors with what resources, batch size, output
format. Unset values are chosen from the cluster's resources so the defaults work on a 2-core laptop
(actors take fractional CPUs, leaving CPU for reading) and on GPU nodes (one actor per GPU)."""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["BatchSettings", "RayUnavailableError", "import_ray", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'unimedvl-core[batch]'"


class RayUnavailableError(RuntimeError):
    """Ray (with Ray Data) is not installed: batch jobs need the ``batch`` extra."""


def import_ray():
    """Ray, imported on first use so that the core works without it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise RayUnavailableError(f"batch inference needs Ray Data ({err.name or 'ray'} is missing): "
                                  f"{INSTALL_HINT}") from None
    return ray


def ray_available() -> bool:
    try:
        import_ray()
    except RayUnavailableError:
        return False
    return True


@dataclass(frozen=True)
class BatchSettings:
    """Args:
        address: ``None`` starts Ray in this process (local); ``"auto"`` or ``"ray://host:10001"`` joins a
            running cluster.
        num_actors: model replicas (default: one per GPU, else half the CPUs, at most 4).
        actor_gpus: GPUs per actor (default: 1 when the cluster has GPUs, else 0).
        actor_cpus: CPUs per actor (default: 1 with a GPU, else half the CPUs shared among the actors).
        batch_size: rows per model call.
        read_cpus: CPUs per reading task.
        format: ``jsonl`` or ``parquet`` record shards.
        progress: a progress bar with rows/s and ETA.
    """

    address: str | None = None
    num_actors: int | None = None
    actor_gpus: float | None = None
    actor_cpus: float | None = None
    batch_size: int = 8
    read_cpus: float = 0.5
    format: str = "jsonl"
    progress: bool = True

    def __post_init__(self):
        for name in ("num_actors", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (got {value})")
        for name in ("actor_gpus", "actor_cpus", "read_cpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative (got {value})")

    def resolved(self, cpus: float, gpus: float) -> "BatchSettings":
        """Every unset value chosen for a cluster with ``cpus`` CPUs and ``gpus`` GPUs."""
        actor_gpus = self.actor_gpus if self.actor_gpus is not None else (1.0 if gpus >= 1 else 0.0)
        if self.num_actors is not None:
            actors = self.num_actors
        elif actor_gpus:
            actors = max(1, int(gpus // actor_gpus))
        else:
            actors = max(1, min(4, int(cpus) // 2))
        actor_cpus = self.actor_cpus
        if actor_cpus is None:
            actor_cpus = 1.0 if actor_gpus else max(0.25, cpus / (2 * actors))
        return replace(self, num_actors=actors, actor_gpus=actor_gpus, actor_cpus=actor_cpus)

    def threads(self) -> int:
        """Torch threads of a CPU actor: its share of the CPUs."""
        return max(1, int(round(self.actor_cpus or 1)))

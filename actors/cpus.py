"""The threads a process that Ray placed should run (model actors, quantize tasks)."""

from __future__ import annotations

import math
import os


def actor_threads() -> int:
    """torch threads of a model actor whose role leaves them to us (`engine.torch_threads=0`): the CPUs Ray gave it
    (`actor.num_cpus`, at least one; Ray sets OMP_NUM_THREADS=1 in its workers, so this undoes that), or every core
    outside Ray. Jobs on a local instance give co-located actors a share of the cores instead (`split_threads`)."""
    import ray

    if ray.is_initialized():
        try:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        except AssertionError:  # the driver, not a Ray worker: no CPUs were assigned to it
            cpus = None
        if cpus is not None:
            return max(1, math.ceil(cpus - 1e-9))
    return os.cpu_count() or 1

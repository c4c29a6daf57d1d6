"""Evaluation sharding now lives in :mod:`fsapp.engine.distributed`; these names are re-exported
only for the modules that still import ``evalshard`` (engine/evaluate.py, cli/evalcmd.py). Delete
this file once they import ``fsapp.engine.distributed`` instead."""

from fsapp.engine.distributed import (
    Shard,
    all_max,
    all_sum,
    barrier,
    current,
    env_world_size,
    finish,
    init_from_env,
    local_device,
)

__all__ = ["Shard", "all_max", "all_sum", "barrier", "current", "env_world_size", "finish", "init_from_env",
           "local_device"]

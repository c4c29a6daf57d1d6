"""A job's randomness, owned by the job: its global RNG state kept private between its steps.

torch draws random starts, dropout masks and initial weights from process-wide generators. A
training job seeds them from its config; :func:`owning_randomness` keeps that stream the job's
own when other code in the same process (a notebook's ``torch.rand``, an ``fsapp.evaluate``
call, a second ``fsapp.train`` generator) runs between its steps: the job's state is swapped in
whenever the job runs and swapped out, and the caller's put back, before each event is handed
over. A run alone therefore draws exactly the numbers it always drew.

CUDA generators are swapped for every device once CUDA is initialised in the process (nothing is
initialised here: a CPU job on a GPU machine creates no CUDA context).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass
class RngState:
    """The process-wide generators' state: the CPU one and, once initialised, every CUDA device's."""

    cpu: Tensor
    cuda: list[Tensor] | None

    @classmethod
    def capture(cls) -> "RngState":
        """The state now."""
        cuda = torch.cuda.get_rng_state_all() if _cuda_ready() else None
        return cls(torch.get_rng_state(), cuda)

    def install(self) -> None:
        """Make this the state of the process-wide generators."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None and _cuda_ready():
            torch.cuda.set_rng_state_all(self.cuda)


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def owning_randomness(events: Iterator[T]) -> Iterator[T]:
    """``events``, advanced with the job's own RNG state in place and the caller's restored
    before each item is yielded (and when the job ends, fails or is closed)."""
    own: RngState | None = None

    def swap_in() -> RngState:
        outer = RngState.capture()
        if own is not None:
            own.install()
        return outer

    def swap_out(outer: RngState) -> None:
        nonlocal own
        own = RngState.capture()
        outer.install()

    try:
        while True:
            outer = swap_in()
            try:
                item = next(events)
            except StopIteration:
                return
            finally:
                swap_out(outer)
            yield item
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            outer = swap_in()
            try:
                close()
            finally:
                swap_out(outer)

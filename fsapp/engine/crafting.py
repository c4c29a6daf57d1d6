"""The model attacks craft on: the same function as the evaluated model, laid out to run faster.

On the CPU a float32 model with 2-D convolutions is crafted on by :class:`CraftingModel`:

- passes that need an input gradient run on a channels-last copy with each BatchNorm folded into
  the convolution before it (``torch.fx``'s eval-mode fusion; oneDNN's convolutions and their input
  gradients are faster in that layout; a model that does not trace symbolically is only re-laid);
- passes without a gradient (Square's queries, FAB's checks, APGD's target ranking) run on a
  frozen trace optimised for inference (convolution and BatchNorm folded, weights prepacked),
  about twice as fast as the eager forward on small CNNs.

Both agree with the model to float rounding (checked when the copy is made, on two batch sizes;
a model that does not trace or does not agree is used as it is). Only crafting uses them: every
example is still counted by the evaluated model itself, so a difference in the last bits can
change which example an attack finds, never what the report counts.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
from torch import Tensor
from torch.fx.experimental.optimization import fuse

AGREEMENT = 1e-4
"""Largest difference (relative to the logits' scale) the optimised copies may show."""


TRACE_AFTER = 8
"""Forward-only passes after which the inference trace is built (it costs about as much as a few
dozen forwards of a small CNN, so an attack that scores rarely, like PGD, never pays for it)."""


class CraftingModel(nn.Module):
    """``grad_net`` (channels-last copy) when autograd records, else the inference trace of
    ``model`` (built after :data:`TRACE_AFTER` forward-only passes; None if it does not agree)."""

    def __init__(self, grad_net: nn.Module, model: nn.Module, probe: Tensor) -> None:
        super().__init__()
        self.grad_net = grad_net
        # not children: mode switches and buffer snapshots never reach them
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_probe", probe)
        object.__setattr__(self, "_fast", None)
        object.__setattr__(self, "_scoring_passes", 0)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self.grad_net(x)
        passes = self._scoring_passes + 1
        object.__setattr__(self, "_scoring_passes", passes)
        if passes == TRACE_AFTER:
            object.__setattr__(self, "_fast", _inference_trace(self._model, self._probe))
        fast = self._fast
        if fast is None:
            return self.grad_net(x)
        with torch.no_grad():
            return fast(x)


def _agrees(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and \
        float((a - b).abs().max()) <= AGREEMENT * max(1.0, float(b.abs().max()))


def _inference_trace(model: nn.Module, probe: Tensor) -> torch.jit.ScriptModule | None:
    """A frozen trace of ``model`` optimised for inference, or None where it does not agree."""
    model = model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(copy.deepcopy(model).eval(), probe[:3], check_trace=False)
            fast = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            for batch in (probe[:5], probe):
                if not _agrees(fast(batch), model(batch)):
                    return None
            return fast
    except Exception:  # anything that does not trace is run eagerly
        return None


def crafting_model(model: nn.Module, probe: Tensor, layout: str = "auto") -> nn.Module:
    """What attacks craft on (see the module docstring); ``layout="keep"``, a model on another
    device or dtype, without 2-D convolutions, or that cannot be copied: the model itself.
    ``probe``: a few inputs of the evaluated shape (the check of the optimised copies)."""
    params = list(model.parameters())
    if layout != "auto" or not params or params[0].device.type != "cpu" or params[0].dtype != torch.float32:
        return model
    if probe.dim() != 4 or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return model
    try:
        twin = copy.deepcopy(model).eval()
    except Exception:  # a module that cannot be copied is attacked as it is
        return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin = fuse(twin)
    except Exception:  # not symbolically traceable: the copy as it is
        pass
    twin = twin.to(memory_format=torch.channels_last).eval()
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if not _agrees(twin(probe), model(probe)) or not _agrees(model(probe), model(probe)):
                return model  # a randomised forward (or one the copy changes) is attacked as it is
    except Exception:  # whatever the model does wrong is for the attacks to meet, reported as theirs
        return model
    finally:
        for m, training in was:
            m.training = training
    return CraftingModel(twin, copy.deepcopy(model).eval(), probe.detach().clone())

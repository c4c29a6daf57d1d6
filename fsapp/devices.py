"""Device names as users write them (``auto``, ``cpu``, ``cuda``, ``cuda:N``): one check for
every command and config key. Whether the device exists is asked later, where torch is."""

from __future__ import annotations

import re

from fsapp.errors import UsageError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N (N: a CUDA device index)"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,4})?")


def check_device_name(name: str) -> str:
    """``name`` if it is a device fsapp can run on; else one line listing the valid choices."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise UsageError(f"unknown device {name!r}; valid: {DEVICE_CHOICES}")
    return name

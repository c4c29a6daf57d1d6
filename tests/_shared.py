"""Helpers shared by several test files: a tiny model and REFERENCE.md's Sinkhorn transcribed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """conv-BN-ReLU-pool-linear on 3x8x8 inputs in [0, 1]."""

    def __init__(self, channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(F.avg_pool2d(h, 2).flatten(1))


def reference_sinkhorn(C: torch.Tensor, reg: float = 0.01, niter: int = 100, thresh: float = 0.1):
    """REFERENCE.md's Sinkhorn, transcribed from its description."""
    m, n = C.shape
    mu = 1.0 / m * torch.ones(m, dtype=C.dtype)
    nu = 1.0 / n * torch.ones(n, dtype=C.dtype)

    def M(u, v):
        return (-C + u.unsqueeze(1) + v.unsqueeze(0)) / reg

    def lse(A):
        return torch.log(torch.exp(A).sum(1, keepdim=True) + 1e-6)

    u, v = 0.0 * mu, 0.0 * nu
    for _ in range(niter):
        u1 = u
        u = reg * (torch.log(mu) - lse(M(u, v)).squeeze()) + u
        v = reg * (torch.log(nu) - lse(M(u, v).t()).squeeze()) + v
        if (u - u1).abs().sum() < thresh:
            break
    return torch.exp(M(u, v))

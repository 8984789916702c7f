"""The linear probe: a 1x1x1 convolution over the feature channels, trained with class-weighted
cross entropy for a fixed number of steps from a fixed seed (deterministic on the CPU), and
its predictions on whole volumes. Time per step and time waiting for data are measured."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dinov3_cache.probe.options import IGNORE

PROGRESS_BLOCKS = 10  # progress lines per training run


class LinearProbe(torch.nn.Module):
    """Standardise each channel (statistics of the first training batch), then a 1x1x1 convolution."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1, 1))
        self.register_buffer("scale", torch.ones(1, channels, 1, 1, 1))
        self.head = torch.nn.Conv3d(channels, classes, kernel_size=1)

    def fit_standardisation(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        self.mean.copy_(flat.mean(dim=1).view_as(self.mean))
        self.scale.copy_((1.0 / flat.std(dim=1).clamp_min(1e-6)).view_as(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x.to(self.mean.dtype) - self.mean) * self.scale)


@dataclass
class TrainingTime:
    steps: int = 0
    seconds: float = 0.0
    waiting: float = 0.0  # blocked on the next batch

    @property
    def per_step_ms(self) -> float:
        return 1000 * self.seconds / max(1, self.steps)

    @property
    def waiting_share(self) -> float:
        return self.waiting / self.seconds if self.seconds > 0 else 0.0


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """Inverse class frequency, mean 1: rare organelles weigh as much as the background."""
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def train_probe(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    counts: np.ndarray,
    steps: int,
    learning_rate: float,
    seed: int,
    device: torch.device,
    label: str,
    progress: Callable[[str], None] | None = None,
) -> tuple[LinearProbe, TrainingTime]:
    """Train on `steps` batches of (x (B, C, D, H, W), target (B, D, H, W), IGNORE outside the mask)."""
    torch.manual_seed(seed)
    timing = TrainingTime()
    start = time.perf_counter()
    x, target = next(batches)
    timing.waiting += time.perf_counter() - start
    probe = LinearProbe(x.shape[1], num_classes).to(device)
    probe.fit_standardisation(x.to(device))
    optimiser = torch.optim.Adam(probe.parameters(), lr=learning_rate)
    weights = class_weights(counts).to(device)
    block = max(1, steps // PROGRESS_BLOCKS)
    for step in range(1, steps + 1):
        if step > 1:
            wait = time.perf_counter()
            x, target = next(batches)
            timing.waiting += time.perf_counter() - wait
        logits = probe(x.to(device))
        loss = F.cross_entropy(logits, target.to(device), weight=weights, ignore_index=IGNORE)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        timing.steps, timing.seconds = step, time.perf_counter() - start
        if progress is not None and (step % block == 0 or step == steps):
            progress(f"probe {label}: step {step}/{steps}  loss {loss.item():.3f}  {timing.per_step_ms:.1f} ms/step")
    return probe, timing


@torch.no_grad()
def predict(probe: LinearProbe, x: torch.Tensor, slab: int = 16) -> torch.Tensor:
    """Class per voxel of one volume (C, D, H, W), a few z slices at a time (bounded memory)."""
    device = probe.mean.device
    parts = [probe(x[None, :, z : z + slab].to(device)).argmax(dim=1)[0].cpu() for z in range(0, x.shape[1], slab)]
    return torch.cat(parts, dim=0)


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)

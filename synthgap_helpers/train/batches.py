"""Training batches on the device: sample order, real/synthetic mixing, augmentation and normalisation.

Everything works on whole batches with a few tensor ops (no per-image Python), and every random
choice draws from one explicit torch.Generator, so a seed fixes the data order and the augmentation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from synthgap_helpers.datasets import CIFAR10_MEAN, CIFAR10_STD

Stats = tuple[tuple[float, ...], tuple[float, ...]]
"""Per-channel (mean, std) on the 0-1 scale that model inputs are normalised with."""
MIX_MODES = ("concat", "fixed_share")


class IndexStream:
    """Endless indices 0..n-1 in passes: each pass is a fresh random permutation, so it shows every sample once."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self._generator = generator
        self._perm = torch.empty(0, dtype=torch.long, device=generator.device)
        self._pos = 0

    def take(self, k: int) -> torch.Tensor:
        """The next k indices, continuing into a new permutation when the current pass runs out."""
        parts = []
        while k > 0:
            if self._pos == len(self._perm):
                self._perm = torch.randperm(self.n, generator=self._generator, device=self._generator.device)
                self._pos = 0
            part = self._perm[self._pos : self._pos + k]
            self._pos += len(part)
            k -= len(part)
            parts.append(part)
        return torch.cat(parts)

    def state(self) -> tuple[torch.Tensor, int]:
        """The current pass and the position in it: with the generator's state, what the next indices depend on."""
        return self._perm, self._pos

    def restore(self, perm: torch.Tensor, pos: int) -> None:
        """Continue from a `state()`: the same pass, the same position."""
        if perm.dtype != torch.long or perm.ndim != 1 or (len(perm) and len(perm) != self.n) or not 0 <= pos <= len(perm):
            raise ValueError(f"not the state of a stream over {self.n} indices: a pass of shape {tuple(perm.shape)}, "
                             f"position {pos}")
        self._perm, self._pos = perm.to(self._generator.device), int(pos)


class BatchIndices:
    """Indices into the pool `cat([real, synthetic])` for each training batch.

    `concat` shuffles the pool as one set; an epoch is one pass over the pool. `fixed_share` draws
    round(batch_size * real_share) real and the rest synthetic images for every batch, each source
    in its own passes; an epoch is one pass over the *real* set (the synthetic set cycles at its own pace).
    Without synthetic images both modes are plain shuffling of the real set.
    """

    def __init__(
        self,
        n_real: int,
        n_synthetic: int,
        batch_size: int,
        generator: torch.Generator,
        mix: str = "concat",
        real_share: float = 0.5,
    ) -> None:
        if mix == "concat" or n_synthetic == 0:
            self._sources = [(IndexStream(n_real + n_synthetic, generator), batch_size, 0)]
        elif mix == "fixed_share":
            n_real_per_batch = real_per_batch(batch_size, real_share)
            self._sources = [
                (IndexStream(n_real, generator), n_real_per_batch, 0),
                (IndexStream(n_synthetic, generator), batch_size - n_real_per_batch, n_real),
            ]
        else:
            raise ValueError(f"mix={mix!r} is not a mixing mode; valid: {', '.join(MIX_MODES)}")

    @property
    def steps_per_epoch(self) -> float:
        """Batches per epoch: one pass over the first source (the pool, or the real set in fixed_share)."""
        stream, count, _ = self._sources[0]
        return stream.n / count

    def next(self) -> torch.Tensor:
        """Pool indices of the next batch, real ones first in fixed_share mode."""
        return torch.cat([stream.take(count) + offset for stream, count, offset in self._sources])

    def state(self) -> tuple[list[torch.Tensor], list[int]]:
        """Each source's current pass and position (the generator's state is the caller's to keep)."""
        states = [stream.state() for stream, _, _ in self._sources]
        return [perm for perm, _ in states], [pos for _, pos in states]

    def restore(self, perms: list[torch.Tensor], positions: list[int]) -> None:
        """Continue from a `state()` of batches over the same sets, so that the next batches are the same."""
        if len(perms) != len(self._sources) or len(positions) != len(self._sources):
            raise ValueError(f"the state holds {len(perms)} sources; these batches draw from {len(self._sources)}")
        for (stream, _, _), perm, pos in zip(self._sources, perms, positions):
            stream.restore(perm, pos)


def real_per_batch(batch_size: int, real_share: float) -> int:
    """How many real images a fixed_share batch holds: round(batch_size * real_share), at least one of each source."""
    return min(max(round(batch_size * real_share), 1), batch_size - 1)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per image: a window of the zero-padded image shifted by up to `pad` px each way, mirrored with p=0.5.

    The same augmentation as torchvision's RandomCrop(size, padding=pad) + RandomHorizontalFlip,
    done for the whole batch by one gather; works on uint8 so it moves a quarter of the bytes.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=device)
    flip = torch.rand((b, 1), generator=generator, device=device) < 0.5
    rows = dy + torch.arange(h, device=device)
    cols = dx + torch.arange(w, device=device)
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(images: torch.Tensor, channels_last: bool = True, stats: Stats | None = None) -> torch.Tensor:
    """uint8 images to float32 normalised per channel with `stats` (None: CIFAR-10's mean/std), as one multiply-add."""
    mean_values, std_values = stats if stats is not None else (CIFAR10_MEAN, CIFAR10_STD)
    mean = torch.tensor(mean_values, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std_values, device=images.device).view(1, 3, 1, 1)
    x = torch.addcmul(-mean / std, images.float(), 1.0 / (255.0 * std))
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

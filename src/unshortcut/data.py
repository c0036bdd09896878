"""Batches from a patch set: lazy reads, train-split normalisation, batch-wise augmentation.

The pixel store is a memory-mapped ``(N, C, S, S)`` array, so a batch is one fancy
index with *sorted* row positions (sequential reads; the OS page cache does the rest)
followed by a reorder to the requested order. There is no per-sample ``Dataset``
indirection: the method hands the loop whole index arrays, and everything after the
read (normalisation, flips, rotations, intensity jitter) is done on the batch tensor.

Determinism and data parallelism: batch index lists come from the method and depend
only on ``(seed, epoch)``; augmentation draws from a ``torch.Generator`` seeded from the
same pair. Under ``torch.distributed`` every rank draws the same index lists and keeps
its strided share of each batch (``distributed.shard``), and the augmentation draws its
random numbers for the whole batch and applies those of the rank's rows, so all ranks
take the same number of steps and together see exactly the single-process batch,
augmented exactly as in one process.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unshortcut import distributed
from unshortcut.errors import UnshortcutError
from unshortcut.prefetch import prefetched
from unshortcut.rows import Batch, GroupedSplit
from unshortcut.stain import HedJitter, StainNormalizer

# Rows per chunk when streaming statistics or predictions over a split.
CHUNK_ROWS = 1024


@dataclass(frozen=True)
class Normalization:
    """What turns stored pixels into model input: an optional stain normalisation, then
    per-channel ``(x - mean) / std``.

    Both are fitted on the training split only (never val/test) and stored in the run,
    so a run scores any other patch set exactly as it saw its own. The channel
    statistics describe the stain-normalised pixels when there is a ``stain`` step.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    stain: StainNormalizer | None = None

    @classmethod
    def identity(cls, channels: int) -> Normalization:
        return cls((0.0,) * channels, (1.0,) * channels)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mean": list(self.mean), "std": list(self.std)}
        if self.stain is not None:
            data["stain"] = self.stain.to_dict()
        return data

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 / std, -mean / std)`` as (1, C, 1, 1) float32 tensors: ``(x - mean) / std``
        is then one fused ``torch.addcmul(bias, x, inv_std)``, the same arithmetic
        wherever a run's input is prepared (batches, ``predict``)."""
        mean = torch.tensor(self.mean, dtype=torch.float64).view(1, -1, 1, 1)
        inv_std = 1 / torch.tensor(self.std, dtype=torch.float64).view(1, -1, 1, 1)
        return inv_std.float(), (-mean * inv_std).float()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        stain = data.get("stain")
        return cls(
            tuple(float(v) for v in data["mean"]),
            tuple(float(v) for v in data["std"]),
            None if stain is None else StainNormalizer.from_dict(stain, "run normalisation"),
        )


def channel_stats(pixels: np.ndarray, rows: np.ndarray, chunk: int = CHUNK_ROWS) -> Normalization:
    """Mean and standard deviation per channel over ``pixels[rows]``, streamed in chunks.

    Sums are accumulated in float64 around a per-channel shift (the first chunk's mean)
    so that 16-bit and float data keep their precision. A constant channel gets std 1.
    """
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        raise ValueError("channel_stats needs at least one row")
    channels = pixels.shape[1]
    shift = np.zeros(channels)
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for start in range(0, len(rows), chunk):
        block = np.asarray(pixels[rows[start : start + chunk]], dtype=np.float64)
        if start == 0:
            shift = block.mean(axis=(0, 2, 3))
        block = block - shift[None, :, None, None]
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / count
    if not (np.isfinite(mean).all() and np.isfinite(total_sq).all()):
        where = getattr(pixels, "filename", None) or "pixels"
        raise UnshortcutError(
            f"{where}: the training patches hold NaN or infinite pixel values "
            "(`unshortcut check` on the patch set names the first one)"
        )
    var = np.maximum(total_sq / count - mean**2, 0.0)
    std = np.sqrt(var)
    std = np.where(std > 1e-12 * np.maximum(np.abs(mean + shift), 1.0), std, 1.0)
    return Normalization(tuple((mean + shift).tolist()), tuple(std.tolist()))


@dataclass(frozen=True)
class Augmentation:
    """Microscopy-safe augmentation: orientation has no meaning, stain strength varies.

    Each patch independently gets a random horizontal flip, a random multiple of 90
    degrees rotation (together: all 8 symmetries of the square, no interpolation) and
    a per-channel intensity ``x * scale + shift`` with ``scale ~ U(1 - s, 1 + s)`` and
    ``shift ~ U(-t, t)`` in normalised units. Spatial transforms are applied to the
    tumor masks too, so masks stay aligned with their patches.

    ``stain`` (HED jitter, RGB brightfield only) acts on raw pixels, before the
    per-channel normalisation: :meth:`before_normalization`. It draws from the same
    generator first, so a batch still depends only on the generator's state.
    """

    flips: bool = True
    rotations: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    stain: HedJitter | None = None

    @classmethod
    def for_training(cls, augment: bool, hed_jitter: float) -> Augmentation | None:
        """The training setting: ``augment`` turns on the geometric and intensity part,
        ``hed_jitter > 0`` the HED jitter of that strength (scale and shift)."""
        stain = HedJitter(hed_jitter, hed_jitter) if hed_jitter > 0 else None
        if augment:
            return cls(stain=stain)
        if stain is not None:
            return cls(False, False, 0.0, 0.0, stain)
        return None

    def before_normalization(
        self,
        x: torch.Tensor,
        generator: torch.Generator,
        rows: np.ndarray | None = None,
        drawn: int | None = None,
    ) -> torch.Tensor:
        """The stain jitter of raw pixels (0..255); the identity without one. ``rows`` and
        ``drawn`` as in ``__call__``."""
        return x if self.stain is None else self.stain(x, generator, rows, drawn)

    def __call__(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        generator: torch.Generator,
        rows: np.ndarray | None = None,
        drawn: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment ``x`` (and ``mask``); random numbers are drawn for ``drawn`` rows (the
        whole batch) and those at ``rows`` applied, so a rank's share of a batch gets
        exactly what the same rows get in one process."""
        n, c = x.shape[:2]
        total = n if drawn is None else drawn
        # Draw every random number up front in a fixed order: the result depends only
        # on the generator's state, whichever options are on.
        flip = torch.rand(total, generator=generator) < 0.5
        turns = torch.randint(0, 4, (total,), generator=generator)
        scale = 1 + self.intensity_scale * (2 * torch.rand(total, c, 1, 1, generator=generator) - 1)
        shift = self.intensity_shift * (2 * torch.rand(total, c, 1, 1, generator=generator) - 1)
        if rows is not None:
            pick = torch.from_numpy(np.asarray(rows, dtype=np.int64))
            flip, turns, scale, shift = flip[pick], turns[pick], scale[pick], shift[pick]
        kind = torch.zeros(n, dtype=torch.int64)
        if self.flips:
            kind += 4 * flip
        if self.rotations:
            kind += turns
        if kind.any():
            # One gather applies each patch's symmetry: output pixel p reads input pixel
            # table[kind, p] (rot90 of a flipped index grid), for images and masks alike.
            size = x.shape[-1]
            source = _symmetry_table(size)[kind].to(x.device)
            x = x.reshape(n, c, -1).gather(2, source[:, None].expand(n, c, -1)).view_as(x)
            if mask is not None:
                mask = mask.reshape(n, -1).gather(1, source).view_as(mask)
        if self.intensity_scale or self.intensity_shift:
            x = torch.addcmul(shift.to(x.device, x.dtype), x, scale.to(x.device, x.dtype))
        return x, mask


@functools.cache
def _symmetry_table(size: int) -> torch.Tensor:
    """(8, size * size) source pixel of every output pixel: kind = 4 * flip + quarter turns."""
    grid = torch.arange(size * size).view(size, size)
    return torch.stack(
        [torch.rot90(g, k, (0, 1)).reshape(-1) for g in (grid, grid.flip(-1)) for k in range(4)]
    )


def augmentation_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, epoch, stream)``."""
    value = np.random.default_rng([seed, epoch, stream, 0xA06]).integers(2**62)
    return torch.Generator().manual_seed(int(value))


class SplitData:
    """One split of a patch set as batches of normalised tensors.

    ``rows`` are the split's pixel-store positions; ``split`` holds its labels,
    attribute bins and groups in the same order, so ``Batch.index`` are row numbers of
    this split (what methods index their ``GroupedSplit`` arrays with). ``stain``
    normalises each batch's raw pixels first; it is None when ``pixels`` is already a
    stain-normalised copy of the store.

    A batch is *read* (pixels in the store's own type, masks as uint8) and then
    *finished* (float, normalised, augmented). On a GPU the raw batch crosses to the
    device (4x fewer bytes for uint8 than float32) and is finished there; on the CPU
    both happen in the prefetch thread.
    """

    def __init__(
        self,
        pixels: np.ndarray,
        masks: np.ndarray | None,
        rows: np.ndarray,
        split: GroupedSplit,
        normalization: Normalization,
        device: torch.device,
        channels_last: bool = False,
        stain: StainNormalizer | None = None,
    ) -> None:
        if len(rows) != len(split):
            raise ValueError(f"{len(rows)} pixel rows for a split of {len(split)} patches")
        self.pixels = pixels
        self.masks = masks
        self.rows = np.asarray(rows, dtype=np.int64)
        self.split = split
        self.device = device
        self.channels_last = channels_last
        self.stain = stain
        self._inv_std, self._bias = normalization.affine()
        self._labels = torch.from_numpy(split.labels.astype(np.int64))
        self._attributes = torch.from_numpy(split.attributes.astype(np.int64))
        self._bins = torch.from_numpy(split.bins.astype(np.int64))
        values = split.values if split.values is not None else split.bins
        self._values = torch.from_numpy(values.astype(np.float32))

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, store: np.ndarray, index: np.ndarray) -> np.ndarray:
        """``store[self.rows[index]]`` with one sorted (sequential) read."""
        positions = self.rows[index]
        order = np.argsort(positions, kind="stable")
        block = store[positions[order]]
        out = np.empty_like(block)
        out[order] = block
        return out

    def read(self, index: np.ndarray, with_masks: bool = True) -> Batch:
        """The rows ``index`` as stored: pixels in their own type (float32 where torch has
        no such type), masks as uint8 (255 = all tumor); labels and attributes."""
        index = np.asarray(index, dtype=np.int64)
        block = self._read(self.pixels, index)
        if block.dtype not in (np.uint8, np.uint16, np.float32):
            block = block.astype(np.float32)
        mask = None
        if with_masks and self.masks is not None:
            mask = torch.from_numpy(self._read(self.masks, index))
        t = torch.from_numpy(index)
        attribute = self._attributes[t]
        y = self._labels[t]
        return Batch(
            x=torch.from_numpy(block),
            y=y,
            attribute=attribute,
            group=y * self.split.n_attributes + attribute,
            index=t,
            bins=self._bins[t],
            values=self._values[t],
            mask=mask,
        )

    def finish(
        self,
        batch: Batch,
        augmentation: Augmentation | None = None,
        generator: torch.Generator | None = None,
        share: tuple[np.ndarray, int] | None = None,
    ) -> Batch:
        """Normalise (and augment) a read batch on whichever device it is.

        ``share`` = (positions, batch size): the batch is the rows at those positions of
        a larger batch, and the augmentation draws as for the larger batch.
        """
        device = batch.x.device
        x = batch.x.float()
        if self.stain is not None:
            x = self.stain.as_stored(x)
        rows, drawn = share if share is not None else (None, None)
        if augmentation is not None:
            if generator is None:
                raise ValueError("augmentation needs a seeded generator")
            x = augmentation.before_normalization(x, generator, rows, drawn)
        x = torch.addcmul(self._bias.to(device), x, self._inv_std.to(device))
        mask = None if batch.mask is None else batch.mask.float().div_(255)
        if augmentation is not None:
            x, mask = augmentation(x, mask, generator, rows, drawn)  # type: ignore[arg-type]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batch.x, batch.mask = x, mask
        return batch

    def load(
        self,
        index: np.ndarray,
        augmentation: Augmentation | None = None,
        generator: torch.Generator | None = None,
        with_masks: bool = True,
        share: tuple[np.ndarray, int] | None = None,
    ) -> Batch:
        """The finished batch of split rows ``index`` on the CPU."""
        return self.finish(self.read(index, with_masks), augmentation, generator, share)

    def batches(
        self,
        indices: Iterable[np.ndarray],
        augmentation: Augmentation | None = None,
        generator: torch.Generator | None = None,
        prefetch: bool = True,
        with_masks: bool = True,
        shard: bool = True,
    ) -> Iterator[Batch]:
        """Batches for a sequence of index arrays, optionally read ahead by a thread.

        Under data parallelism (and ``shard``) each yielded batch is this rank's share of
        the batch. Batches are finished in order with the one generator, so they are
        identical with and without prefetching, on the CPU and on a GPU.
        """
        sharded = shard and distributed.world() > 1
        arrays = (np.asarray(i) for i in indices)
        jobs = ((i, distributed.positions(len(i)) if sharded else slice(None)) for i in arrays)

        def share(index: np.ndarray, positions: Any) -> tuple[np.ndarray, int] | None:
            return (positions, len(index)) if sharded else None

        if self.device.type == "cpu":
            loads = (
                self.load(i[p], augmentation, generator, with_masks, share(i, p)) for i, p in jobs
            )
            yield from prefetched(loads) if prefetch else loads
            return
        reads = ((self.read(i[p], with_masks), share(i, p)) for i, p in jobs)
        for raw, part in prefetched(reads) if prefetch else reads:
            moved = raw.to(self.device)
            yield self.finish(moved, augmentation, generator, part)

    def sequential(
        self,
        batch_size: int,
        prefetch: bool = True,
        rows: slice | None = None,
        with_masks: bool = False,
    ) -> Iterator[Batch]:
        """``rows`` (default every row) once, in order, without augmentation, in batches
        read whole on every rank (for prediction; ranks split rows themselves); masks only
        when asked for (scoring pixel maps)."""
        selected = np.arange(len(self))[rows or slice(None)]
        starts = range(0, len(selected), batch_size)
        index = (selected[s : s + batch_size] for s in starts)
        return self.batches(index, prefetch=prefetch, with_masks=with_masks, shard=False)

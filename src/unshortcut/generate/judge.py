"""The independent judge of generated patches: a small CNN trained on real patches only.

It predicts the label and every group attribute's bin (tissue-ratio bin, site, ...)
from the pixels, one linear head each on the default small CNN's features. Trained
on the real training rows, with every group drawn equally often: a judge trained
the plain way learns the very shortcut this toolkit studies ("little tissue = no
tumor") and would call a good tumor patch with little tissue wrong. Its accuracy
on real validation patches, reported next to the accuracy on generated ones, says
how far to trust it. Its penultimate features also serve the Frechet distance.

The judge depends on the patch set, the group attributes and the seed, not on the
generator, so it is trained once and cached in the generator run folder.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from unshortcut.atomic import atomic_write_bytes
from unshortcut.generate.scaling import PixelScaling
from unshortcut.generate.training import derive_seed, random_symmetry
from unshortcut.groups import GroupScheme
from unshortcut.models import small_cnn

# At most this many real training rows are read to train the judge.
MAX_TRAIN_ROWS = 10_000
BATCH = 128
LR = 2e-3
LABEL_HEAD = "label"


class JudgeNet(nn.Module):
    """Small-CNN features and one linear head per predicted column."""

    def __init__(
        self, channels: int, input_size: int, heads: dict[str, int], init_seed: int
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.backbone, width = small_cnn.build(channels, input_size, False)
            self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {name: head(features) for name, head in self.heads.items()}


@dataclass
class Judge:
    """A trained judge and the pixel scaling its inputs use."""

    net: JudgeNet
    scaling: PixelScaling
    device: torch.device

    @property
    def heads(self) -> list[str]:
        return list(self.net.heads)

    @torch.no_grad()
    def run(self, pixels: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Predicted class per head and penultimate features of stored-dtype ``pixels``."""
        self.net.eval()
        predictions: dict[str, list[np.ndarray]] = {h: [] for h in self.heads}
        features = []
        for start in range(0, len(pixels), BATCH):
            x = torch.from_numpy(self.scaling.forward(pixels[start : start + BATCH]))
            f = self.net.backbone(x.to(self.device))
            features.append(f.float().cpu().numpy())
            for name, head in self.net.heads.items():
                predictions[name].append(head(f).argmax(1).cpu().numpy())
        width = self.net.heads[LABEL_HEAD].in_features
        return (
            {h: np.concatenate(p) if p else np.zeros(0, np.int64) for h, p in predictions.items()},
            np.concatenate(features) if features else np.zeros((0, width), np.float32),
        )


def targets(scheme: GroupScheme, labels: np.ndarray, bins: np.ndarray) -> dict[str, np.ndarray]:
    """Per head, the class each row should get: the label, then each attribute's bin."""
    out = {LABEL_HEAD: labels}
    for k, attribute in enumerate(scheme.attributes):
        out[attribute.column] = bins[:, k]
    return out


def attribute_bins(scheme: GroupScheme, table: pd.DataFrame, source: str) -> np.ndarray:
    """``(N, n_attributes)`` bin index of every row for each group attribute."""
    columns = [a.bin_index(table, source) for a in scheme.attributes]
    return np.stack(columns, axis=1) if columns else np.zeros((len(table), 0), np.int64)


def cached_judge(
    cache: Path,
    pixels: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    bins: np.ndarray,
    scheme: GroupScheme,
    scaling: PixelScaling,
    *,
    epochs: int,
    seed: int,
    device: torch.device,
    key: str,
) -> Judge:
    """Load the judge for ``key`` from ``cache`` or train it on ``pixels[rows]`` and store it."""
    heads = {LABEL_HEAD: scheme.n_classes, **{a.column: a.n_bins for a in scheme.attributes}}
    digest = hashlib.sha256(
        json.dumps([key, scheme.to_dict(), epochs, seed], sort_keys=True).encode()
    ).hexdigest()[:16]
    path = cache / f"judge-{digest}.pt"
    net = JudgeNet(pixels.shape[1], pixels.shape[-1], heads, derive_seed(seed, 0x7D6E))
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return Judge(net.to(device), scaling, device)
    net = net.to(device)
    _train(net, pixels, rows, labels, bins, scheme, scaling, epochs, seed, device)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Judge(net, scaling, device)


def _train(
    net: JudgeNet,
    pixels: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    bins: np.ndarray,
    scheme: GroupScheme,
    scaling: PixelScaling,
    epochs: int,
    seed: int,
    device: torch.device,
) -> None:
    """Group-balanced training: each epoch draws ``len(rows)`` rows, every group equally."""
    rng = np.random.default_rng([seed, 0x7D6E])
    if len(rows) > MAX_TRAIN_ROWS:
        keep = np.sort(rng.choice(len(rows), MAX_TRAIN_ROWS, replace=False))
        rows, labels, bins = rows[keep], labels[keep], bins[keep]
    order = np.argsort(rows)
    stored = np.empty((len(rows), *pixels.shape[1:]), pixels.dtype)
    stored[order] = pixels[rows[order]]  # one sorted read, back in row order
    attribute = np.zeros(len(rows), np.int64)
    for k, a in enumerate(scheme.attributes):
        attribute = attribute * a.n_bins + bins[:, k]
    groups = labels * scheme.n_attributes + attribute
    weight = 1.0 / np.bincount(groups)[groups]
    p = weight / weight.sum()
    want = targets(scheme, labels, bins)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(derive_seed(seed, 0x7D6E, 1))
    net.train()
    for _ in range(epochs):
        draw = rng.choice(len(rows), len(rows), replace=True, p=p)
        for start in range(0, len(draw), BATCH):
            index = draw[start : start + BATCH]
            x = random_symmetry(torch.from_numpy(scaling.forward(stored[index])), generator)
            out = net(x.to(device))
            loss = sum(
                nn.functional.cross_entropy(out[h], torch.from_numpy(want[h][index]).to(device))
                for h in out
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()

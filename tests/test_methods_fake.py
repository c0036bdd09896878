"""A small fake TrainContext for method unit tests (imported by the other method tests).

Rows are random feature vectors fed to a tiny MLP with ``.features`` and ``.head``, so
every method hook runs in milliseconds without the real training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from unshortcut.methods import Batch, GroupedSplit
from unshortcut.models import ModelOutput

N_FEATURES = 5


class TinyNet(nn.Module):
    """Linear(-BatchNorm)-ReLU features and a linear head, like models.Classifier."""

    def __init__(self, n_classes: int = 2, batchnorm: bool = False, hidden: int = 8) -> None:
        super().__init__()
        norm: list[nn.Module] = [nn.BatchNorm1d(hidden)] if batchnorm else []
        self.body = nn.Sequential(nn.Linear(N_FEATURES, hidden), *norm, nn.ReLU())
        self.head = nn.Linear(hidden, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def outputs(self, x: torch.Tensor) -> ModelOutput:
        features = self.features(x)
        return ModelOutput(logits=self.head(features), features=features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def last_layer(self) -> nn.Linear:
        return self.head


def make_split(counts: np.ndarray, n_images: int = 10, seed: int = 0) -> GroupedSplit:
    """Rows with ``counts[y, a]`` rows per group, images assigned round-robin."""
    counts = np.asarray(counts)
    labels = np.repeat(np.arange(counts.shape[0]), counts.sum(axis=1))
    attributes = np.concatenate([np.repeat(np.arange(counts.shape[1]), row) for row in counts])
    images = np.array([f"img{i % n_images}" for i in range(len(labels))])
    return GroupedSplit.from_attributes(
        labels, attributes, images, counts.shape[0], counts.shape[1]
    )


@dataclass
class FakeContext:
    """Implements the TrainContext protocol on in-memory tensors."""

    train: GroupedSplit
    val: GroupedSplit
    batch_size: int = 16
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batchnorm: bool = False
    pretrained: bool = False
    auxiliary_probs: np.ndarray | None = None
    auxiliary_calls: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self.inputs = {
            name: torch.randn(len(split), N_FEATURES, generator=gen)
            + torch.as_tensor(split.groups, dtype=torch.float32)[:, None]
            for name, split in (("train", self.train), ("val", self.val))
        }
        self.auxiliary: nn.Module | None = None

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return TinyNet(self.train.n_classes, self.batchnorm)

    def make_optimizer(
        self, params: Any, lr_factor: float = 1.0, weight_decay_factor: float = 1.0
    ) -> torch.optim.Optimizer:
        return torch.optim.SGD(list(params), lr=0.1 * lr_factor)

    def fit_auxiliary(self, method: Any, **kwargs: Any) -> nn.Module:
        self.auxiliary_calls.append({"method": method.name, **kwargs})
        self.auxiliary = self.new_model()
        return self.auxiliary

    def predict(self, model: nn.Module, split: str) -> np.ndarray:
        if model is self.auxiliary and self.auxiliary_probs is not None:
            return self.auxiliary_probs
        with torch.no_grad():
            return F.softmax(model.eval()(self.inputs[split]), dim=1).numpy()

    def features(self, model: nn.Module, split: str) -> np.ndarray:
        with torch.no_grad():
            return model.eval().features(self.inputs[split]).numpy()

    def batch(self, rows: np.ndarray) -> Batch:
        """The Batch the loop would build for training rows ``rows`` (order kept)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        split = self.train
        return Batch(
            x=self.inputs["train"][index],
            y=torch.as_tensor(split.labels)[index],
            attribute=torch.as_tensor(split.attributes)[index],
            group=torch.as_tensor(split.groups)[index],
            index=index,
            bins=torch.as_tensor(split.bins)[index],
            values=torch.as_tensor(split.values, dtype=torch.float32)[index],
        )


def test_fake_context_batches_follow_rows() -> None:
    ctx = FakeContext(make_split([[3, 1], [1, 3]]), make_split([[2, 2], [2, 2]]))
    batch = ctx.batch(np.array([7, 0, 4]))
    assert batch.y.tolist() == [1, 0, 1]
    assert batch.group.tolist() == [3, 0, 2]
    assert ctx.predict(ctx.new_model(), "val").shape == (8, 2)

"""TensorBoard event files beside history.jsonl (optional extra ``unshortcut[tensorboard]``).

history.jsonl stays the record every tool reads; the event files under
``RUN/tensorboard/`` are for watching runs live (``tensorboard --logdir runs``). Each
epoch logs the method's loss terms (``train/<term>``), the learning rate and the
validation headline metrics (``val/<metric>``).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from unshortcut.errors import UnshortcutError

VAL_SCALARS = (
    "worst_group_accuracy",
    "balanced_accuracy",
    "group_balanced_accuracy",
    "accuracy",
    "auroc",
    "robust_auroc",
    "loss",
)


class EventLog:
    """A SummaryWriter when enabled, else nothing (so the loop calls it unconditionally)."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.writer: Any = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UnshortcutError(
                    "--tensorboard: the tensorboard package is missing "
                    "(pip install 'unshortcut[tensorboard]')"
                ) from None
            self.writer = SummaryWriter(log_dir=str(folder))

    def epoch(self, epoch: int, terms: dict[str, float], lr: float, val: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for name, value in terms.items():
            self.writer.add_scalar(f"train/{name}", value, epoch)
        self.writer.add_scalar("train/lr", lr, epoch)
        for name in VAL_SCALARS:
            if val.get(name) is not None:
                self.writer.add_scalar(f"val/{name}", val[name], epoch)
        self.writer.flush()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        if self.writer is not None:
            self.writer.close()

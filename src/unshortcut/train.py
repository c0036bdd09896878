"""The single training loop: one model, one method, checkpoints, resume, selection.

``train(config)`` writes a run folder (contract 3.4)::

    RUN/config.json               resolved config + method hyperparameters + groups + normalisation
    RUN/history.jsonl             one line per epoch: epoch, train loss, lr, validation metrics
    RUN/checkpoints/last.pt       everything needed to resume (written after every epoch)
    RUN/checkpoints/best-<c>.pt   weights of the best epoch by validation criterion c
    RUN/checkpoints/final-<c>.pt  the same after ``method.finalize`` (what evaluate/predict load)
    RUN/predictions/{val,test}.parquet   at the primary criterion's checkpoint
    RUN/metrics.json              written last: a run without it is unfinished

Criteria that pick the same epoch share one weights file (hard links), so six criteria
cost at most six copies of the weights and usually one or two.

Honest selection: every choice (best epoch per criterion, auxiliary models' epochs)
reads validation metrics only. The test split is not even loaded until training is
over, and it is scored once per selected checkpoint, at the end.

Determinism: each epoch draws its batches from ``np.random.default_rng([seed, epoch])``
and its augmentation and torch RNG from seeds derived from ``(seed, epoch)``, so a run
resumed from ``last.pt`` (saved at epoch boundaries) continues bit for bit like an
uninterrupted one on the same machine.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from unshortcut import __version__
from unshortcut.atomic import atomic_directory, atomic_write_bytes, atomic_write_text
from unshortcut.config import RESUME_FREE_FIELDS, TrainConfig
from unshortcut.data import (
    Augmentation,
    Normalization,
    SplitData,
    augmentation_generator,
    channel_stats,
)
from unshortcut.errors import UnshortcutError
from unshortcut.groups import GroupScheme, fit_groups, parse_attribute_specs
from unshortcut.methods import GroupedSplit, Method, get_method
from unshortcut.methods.erm import ERM, ClassBalancedERM
from unshortcut.metrics import evaluate_predictions, rarest_attribute_per_class, selection_value
from unshortcut.models import Classifier, build_model
from unshortcut.tiling.patchset import PatchSet

SPLITS = ("train", "val", "test")
EVAL_BATCH = 256
# Separate random streams (the third seed word) so that nothing shares draws.
_MAIN, _AUX, _INIT, _FINALIZE = 0, 1, 2, 3


def derive_seed(*words: int) -> int:
    """A 62-bit seed that depends on every word (numpy's SeedSequence mixing)."""
    return int(np.random.default_rng(list(words)).integers(2**62))


# --------------------------------------------------------------------------- data


@dataclass
class RunData:
    """A patch set seen through a run: groups, normalisation and per-split batches."""

    patchset: PatchSet
    scheme: GroupScheme
    normalization: Normalization
    tables: dict[str, pd.DataFrame]
    splits: dict[str, GroupedSplit]
    loaders: dict[str, SplitData]
    rare_attribute: list[int]
    """Per class, the attribute bin rarest in the *training* split (robust AUROC)."""


def load_run_data(
    patches: Path,
    *,
    device: torch.device,
    splits: tuple[str, ...] = SPLITS,
    scheme: GroupScheme | None = None,
    normalization: Normalization | None = None,
    rare_attribute: list[int] | None = None,
    config: TrainConfig | None = None,
) -> RunData:
    """Open a patch set and prepare ``splits``.

    Training fits the group scheme and the normalisation on the training split
    (``config`` given); evaluation passes the run's own ``scheme``, ``normalization``
    and ``rare_attribute`` so that another patch set is scored on the run's terms.
    """
    patchset = PatchSet.open(patches)
    table = patchset.table
    source = str(patches)
    tables = {s: table.iloc[patchset.rows(s)].reset_index(drop=True) for s in SPLITS}
    if scheme is None:
        assert config is not None
        specs = parse_attribute_specs(config.attributes, config.taus)
        scheme = fit_groups(tables["train"], specs, source=f"{source} (train split)")
    if normalization is None:
        assert config is not None
        if not len(tables["train"]):
            raise UnshortcutError(f"{source}: the training split has no patches")
        normalization = (
            channel_stats(patchset.pixels, patchset.rows("train"))
            if config.normalize
            else Normalization.identity(patchset.channels)
        )
    if rare_attribute is None:
        train_source = f"{source} (train split)"
        rare_attribute = rarest_attribute_per_class(
            scheme.labels(tables["train"], train_source),
            scheme.attribute_index(tables["train"], train_source),
            scheme.n_classes,
            scheme.n_attributes,
        )
    grouped, loaders = {}, {}
    for s in splits:
        if not len(tables[s]):
            raise UnshortcutError(f"{source}: the {s} split has no patches")
        labels = scheme.labels(tables[s], f"{source} ({s} split)")
        if s != "train" and len(np.unique(labels)) < scheme.n_classes:
            warnings.warn(
                f"{source}: the {s} split holds one class only; AUROC and robust AUROC "
                "are reported as null and balanced accuracy covers that class alone",
                stacklevel=2,
            )
        grouped[s] = GroupedSplit(
            labels=labels,
            attributes=scheme.attribute_index(tables[s], f"{source} ({s} split)"),
            image_ids=tables[s]["image_id"].to_numpy(),
            n_classes=scheme.n_classes,
            n_attributes=scheme.n_attributes,
        )
        loaders[s] = SplitData(
            patchset.pixels, patchset.masks, patchset.rows(s), grouped[s], normalization, device
        )
    return RunData(patchset, scheme, normalization, tables, grouped, loaders, rare_attribute)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UnshortcutError("--device cuda: no CUDA device is available")
    return torch.device(name)


# --------------------------------------------------------------------------- the loop


@torch.no_grad()
def infer(
    model: nn.Module, loader: SplitData, *, features: bool = False, prefetch: bool = True
) -> np.ndarray:
    """Class probabilities ``(N, K)`` (or penultimate features) of every row, in order."""
    was_training = model.training
    model.eval()
    out = []
    for batch in loader.sequential(EVAL_BATCH, prefetch):
        if features:
            out.append(model.features(batch.x).float().cpu())  # type: ignore[operator]
        else:
            out.append(torch.softmax(model(batch.x).float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


class TrainingDiverged(UnshortcutError):
    """The loss became NaN or infinite."""


def make_optimizer(
    params: list[nn.Parameter], config: TrainConfig, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch learning-rate factor: constant, or a cosine from 1 towards 0."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)


def train_epoch(
    model: nn.Module,
    method: Method,
    loader: SplitData,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    seed: int,
    stream: int,
    augmentation: Augmentation | None,
    prefetch: bool,
    on_step: Callable[[int, int], None] | None = None,
) -> float:
    """One epoch of the method's batches; returns the mean of the step losses.

    The batches of an epoch are drawn up front (they depend only on ``(seed, epoch)``),
    which fixes the step count for progress bars and makes prefetching safe.
    """
    rng = np.random.default_rng([seed, epoch] if stream == _MAIN else [seed, epoch, stream])
    indices = list(method.epoch_batches(epoch, rng))
    generator = augmentation_generator(seed, epoch, stream)
    torch.manual_seed(derive_seed(seed, epoch, stream))  # dropout and the like
    model.train()
    total = 0.0
    for step, batch in enumerate(
        loader.batches(indices, augmentation, generator, prefetch=prefetch)
    ):
        loss = method.loss(model, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"training diverged: the loss is {value} at epoch {epoch}, step {step} "
                "(try a lower --lr)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value
        if on_step is not None:
            on_step(step + 1, len(indices))
    return total / max(len(indices), 1)


class _WeightedERM(ERM):
    """ERM whose epoch draws ``len(train)`` rows with replacement by row weights."""

    name = "_weighted_erm"

    def __init__(self, ctx: Any, weights: np.ndarray) -> None:
        super().__init__(ctx)
        if len(weights) != len(ctx.train) or not (weights >= 0).all() or weights.sum() <= 0:
            raise ValueError("row_weights must be non-negative, not all zero, one per train row")
        self.p = np.asarray(weights, dtype=float) / float(np.sum(weights))

    def epoch_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        rows = rng.choice(len(self.p), size=len(self.p), replace=True, p=self.p)
        for start in range(0, len(rows), self.ctx.batch_size):
            yield rows[start : start + self.ctx.batch_size]


class LoopContext:
    """The :class:`~unshortcut.methods.base.TrainContext` the loop offers to methods."""

    def __init__(self, config: TrainConfig, data: RunData, device: torch.device) -> None:
        self.config = config
        self.data = data
        self.train = data.splits["train"]
        self.val = data.splits["val"]
        self.batch_size = config.batch_size
        self.seed = config.seed
        self.device = device
        self.augmentation = Augmentation() if config.augment else None
        self._models = 0
        self._auxiliaries = 0
        # Validation rows scored for selection and metrics: all of them, unless the
        # method trains on some (DFR fits its head on half of the validation images).
        self.val_rows: np.ndarray | None = None

    def new_model(self) -> Classifier:
        """A fresh model; the n-th call of a run always gets the same initial weights."""
        self._models += 1
        pixels = self.data.patchset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self._models, _INIT))
            model = build_model(
                self.config.model,
                pixels.channels,
                self.train.n_classes,
                pixels.input_size,
                pretrained=self.config.pretrained,
            )
        return model.to(self.device)

    def predict(self, model: nn.Module, split: str) -> np.ndarray:
        return infer(model, self.data.loaders[split], prefetch=self.config.prefetch)

    def features(self, model: nn.Module, split: str) -> np.ndarray:
        return infer(model, self.data.loaders[split], features=True, prefetch=self.config.prefetch)

    def validation_metrics(self, model: nn.Module) -> dict[str, Any]:
        """Validation metrics without bootstrap (cheap enough for every epoch)."""
        probs = self.predict(model, "val")
        return score_split(self.data, "val", probs, bootstrap=0, seed=self.seed, rows=self.val_rows)

    def fit_auxiliary(
        self,
        *,
        epochs: int,
        lr_factor: float = 1.0,
        weight_decay_factor: float = 1.0,
        class_balanced: bool = False,
        select_by: str = "last",
        row_weights: np.ndarray | None = None,
    ) -> nn.Module:
        if class_balanced and row_weights is not None:
            raise ValueError("fit_auxiliary: class_balanced and row_weights exclude each other")
        self._auxiliaries += 1
        stream = _AUX * 1000 + self._auxiliaries
        model = self.new_model()
        if row_weights is not None:
            method: Method = _WeightedERM(self, row_weights)
        else:
            method = (ClassBalancedERM if class_balanced else ERM)(self)
        config = self.config
        optimizer = make_optimizer(
            list(model.parameters()),
            config,
            config.lr * lr_factor,
            config.weight_decay * weight_decay_factor,
        )
        scheduler = make_scheduler(optimizer, config.schedule, epochs)
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        for epoch in range(epochs):
            train_epoch(
                model,
                method,
                self.data.loaders["train"],
                optimizer,
                epoch=epoch,
                seed=self.seed,
                stream=stream,
                augmentation=self.augmentation,
                prefetch=config.prefetch,
            )
            scheduler.step()
            if select_by != "last":
                value = selection_value(self.validation_metrics(model), select_by)
                if best is None or value > best[0]:
                    best = (value, copy.deepcopy(model.state_dict()))
        if best is not None:
            model.load_state_dict(best[1])
        return model.eval()


def score_split(
    data: RunData,
    split: str,
    probs: np.ndarray,
    *,
    bootstrap: int,
    seed: int,
    rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of ``split`` (see unshortcut.metrics) plus the mean cross-entropy "loss".

    ``rows`` restricts scoring to those rows of the split (validation rows a method
    did not train on); default all.
    """
    grouped = data.splits[split]
    if rows is not None:
        grouped = grouped.subset(rows)
        probs = probs[rows]
    metrics = evaluate_predictions(
        labels=grouped.labels,
        scores=probs[:, 1],
        attributes=grouped.attributes,
        image_ids=grouped.image_ids,
        group_names=list(data.scheme.group_names),
        n_attributes=grouped.n_attributes,
        rare_attribute_by_class=data.rare_attribute,
        n_bootstrap=bootstrap,
        seed=seed,
    )
    picked = probs[np.arange(len(grouped.labels)), grouped.labels]
    metrics["loss"] = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    return metrics


def _selection_rows(method: Method, n_val: int) -> np.ndarray | None:
    """Validation rows left for selection once the method's own rows are removed."""
    reserved = method.reserved_val_rows()
    if not len(reserved):
        return None
    return np.setdiff1d(np.arange(n_val), reserved)


def predictions_table(data: RunData, split: str, probs: np.ndarray) -> pd.DataFrame:
    """Contract 3.4 predictions: enough to recompute every metric independently."""
    grouped = data.splits[split]
    table = data.tables[split]
    attribute_names = np.asarray(data.scheme.attribute_names, dtype=object)
    group_names = np.asarray(data.scheme.group_names, dtype=object)
    return pd.DataFrame(
        {
            "patch_id": table["patch_id"].to_numpy(),
            "image_id": table["image_id"].to_numpy(),
            "label": grouped.labels,
            "group": group_names[grouped.groups],
            "attribute": attribute_names[grouped.attributes],
            "score": probs[:, 1].astype(np.float64),
            "prediction": probs.argmax(axis=1).astype(np.int64),
        }
    )


# --------------------------------------------------------------------------- files


def _save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load(path: Path, device: torch.device) -> Any:
    return torch.load(path, map_location=device, weights_only=False)


def _link(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source`` (a hard link; a copy where unsupported)."""
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def jsonable(value: Any) -> Any:
    """NaN/inf become null so metrics.json stays strict JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _weights(model: nn.Module, method: Method, epoch: int) -> dict[str, Any]:
    extra = method.extra_modules()
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "extra": None if extra is None else extra.state_dict(),
    }


@contextmanager
def reproducible(config: TrainConfig, device: torch.device) -> Iterator[None]:
    """Deterministic kernels, fixed thread count, and no leak of RNG state to the caller."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


class _Progress:
    """A rich progress bar, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=False,
            )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def task(self, description: str, total: int, completed: int = 0) -> Any:
        if self.bar is None:
            return None
        return self.bar.add_task(description, total=total, completed=completed)

    def update(self, task: Any, **kwargs: Any) -> None:
        if self.bar is not None and task is not None:
            self.bar.update(task, **kwargs)


# --------------------------------------------------------------------------- train


def _check_folder(config: TrainConfig, resume: bool, overwrite: bool) -> bool:
    """Refuse unusable run folders (no side effects); True when there is a checkpoint."""
    out = config.out
    if resume and overwrite:
        raise UnshortcutError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise UnshortcutError(f"{out}: exists and is not a folder")
    used = out.is_dir() and any(out.iterdir())
    if resume:
        if not (out / "config.json").is_file():
            raise UnshortcutError(f"{out}: no run to resume (config.json is missing)")
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
        current = config.to_json_dict()
        differ = sorted(
            k
            for k in current
            if k not in RESUME_FREE_FIELDS and k != "hp" and saved.get(k) != current[k]
        )
        # Saved hyperparameters are resolved (defaults filled in); compare those given.
        if any(saved.get("hp", {}).get(k) != v for k, v in config.hp.items()):
            differ.append("hp")
        if differ:
            raise UnshortcutError(
                f"{out}: --resume with settings that differ from the run's config.json "
                f"({', '.join(differ)})"
            )
        return (out / "checkpoints" / "last.pt").is_file()
    if used and not overwrite:
        raise UnshortcutError(
            f"{out}: already holds files (pass --resume to continue the run there "
            "or --overwrite to replace it)"
        )
    return False


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int], None] | None = None,
) -> Path:
    """Train ``config.method`` on ``config.patches`` into ``config.out``; returns the run folder.

    ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is on disk (sweeps
    report progress with it; tests kill runs with it).
    """
    device = resolve_device(config.device)
    has_checkpoint = _check_folder(config, resume, overwrite)
    run = config.out
    with reproducible(config, device):
        data = load_run_data(config.patches, device=device, splits=("train", "val"), config=config)
        ctx = LoopContext(config, data, device)
        method = get_method(config.method)(ctx, **config.hp)
        ctx.val_rows = _selection_rows(method, len(ctx.val))
        model = ctx.new_model()
        # Bad input has been refused by now: only then is an old run replaced.
        if not resume:
            if overwrite and run.exists():
                shutil.rmtree(run)
            run.mkdir(parents=True, exist_ok=True)
        extra = method.extra_modules()
        if extra is not None:
            extra.to(device)
        params = list(model.parameters()) + ([] if extra is None else list(extra.parameters()))
        optimizer = make_optimizer(params, config, config.lr, config.weight_decay)
        scheduler = make_scheduler(optimizer, config.schedule, config.epochs)
        history: list[dict[str, Any]] = []
        best: dict[str, dict[str, Any]] = {}
        start = 0
        if has_checkpoint:
            state = _load(run / "checkpoints" / "last.pt", device)
            model.load_state_dict(state["model"])
            if extra is not None:
                extra.load_state_dict(state["extra"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            method.load_state_dict(state["method"])
            history, best, start = state["history"], state["best"], state["epoch"] + 1
        else:
            _write_json(run / "config.json", _resolved_config(config, method, data))
            method.prepare()
        _write_history(run, history)

        with _Progress(progress) as bar:
            epochs_task = bar.task("epochs", config.epochs, completed=start)
            for epoch in range(start, config.epochs):
                steps_task = bar.task(f"epoch {epoch}", method.steps_per_epoch())
                try:
                    loss = train_epoch(
                        model,
                        method,
                        data.loaders["train"],
                        optimizer,
                        epoch=epoch,
                        seed=config.seed,
                        stream=_MAIN,
                        augmentation=ctx.augmentation,
                        prefetch=config.prefetch,
                        on_step=lambda done, total, t=steps_task: bar.update(
                            t, completed=done, total=total
                        ),
                    )
                except TrainingDiverged as error:
                    kept = (
                        f"the last good checkpoint (epoch {epoch - 1}) is {run}/checkpoints/last.pt"
                        if epoch
                        else "no epoch finished, so there is no checkpoint"
                    )
                    raise TrainingDiverged(f"{run}: {error}; {kept}") from None
                method.on_epoch_end(epoch, model)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                val = ctx.validation_metrics(model)
                history.append(jsonable({"epoch": epoch, "train_loss": loss, "lr": lr, "val": val}))
                _write_history(run, history)
                _update_best(run, config, best, val, _weights(model, method, epoch))
                _save(
                    {
                        **_weights(model, method, epoch),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "method": method.state_dict(),
                        "history": history,
                        "best": best,
                    },
                    run / "checkpoints" / "last.pt",
                )
                if bar.bar is not None:
                    bar.bar.remove_task(steps_task)
                bar.update(
                    epochs_task,
                    advance=1,
                    description=f"epochs (loss {loss:.3f}, "
                    f"val {config.primary_criterion} {_fmt(val, config.primary_criterion)})",
                )
                if on_epoch_end is not None:
                    on_epoch_end(epoch)

        _finish(run, config, ctx, method, best)
    return run


def _fmt(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else f"{value:.3f}"


def _write_history(run: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(line, allow_nan=False) + "\n" for line in history)
    atomic_write_text(run / "history.jsonl", text)


def _resolved_config(config: TrainConfig, method: Method, data: RunData) -> dict[str, Any]:
    return jsonable(
        {
            **config.to_json_dict(),
            "hp": dict(method.hp),
            "groups": data.scheme.to_dict(),
            "normalization": data.normalization.to_dict(),
            "rare_attribute_by_class": data.rare_attribute,
            "input": {"channels": data.patchset.channels, "size": data.patchset.input_size},
            "unshortcut_version": __version__,
        }
    )


def _update_best(
    run: Path,
    config: TrainConfig,
    best: dict[str, dict[str, Any]],
    val: dict[str, Any],
    weights: dict[str, Any],
) -> None:
    """Keep, per criterion, the weights of the best validation epoch (ties: the earlier)."""
    written: Path | None = None
    for criterion in config.select_by:
        value = selection_value(val, criterion)
        if criterion in best and not value > best[criterion]["value"]:
            continue
        target = run / "checkpoints" / f"best-{criterion}.pt"
        if written is None:
            _save(weights, target)
            written = target
        else:
            _link(written, target)
        best[criterion] = {"epoch": weights["epoch"], "value": value}


def _load_weights(ctx: LoopContext, method: Method, path: Path) -> nn.Module:
    state = _load(path, ctx.device)
    model = ctx.new_model()
    model.load_state_dict(state["model"])
    extra = method.extra_modules()
    if extra is not None and state["extra"] is not None:
        extra.load_state_dict(state["extra"])
    return model


def _finish(
    run: Path,
    config: TrainConfig,
    ctx: LoopContext,
    method: Method,
    best: dict[str, dict[str, Any]],
) -> None:
    """Finalize and score each selected checkpoint once; then write predictions and metrics."""
    data = load_run_data(
        config.patches,
        device=ctx.device,
        splits=("test",),
        scheme=ctx.data.scheme,
        rare_attribute=ctx.data.rare_attribute,
        normalization=ctx.data.normalization,
    )
    ctx.data.loaders["test"] = data.loaders["test"]
    ctx.data.splits["test"] = data.splits["test"]
    ctx.data.tables["test"] = data.tables["test"]
    by_epoch: dict[int, dict[str, Any]] = {}
    finals: dict[int, Path] = {}
    for criterion in config.select_by:
        epoch = int(best[criterion]["epoch"])
        target = run / "checkpoints" / f"final-{criterion}.pt"
        if epoch in by_epoch:
            _link(finals[epoch], target)
            continue
        source = run / "checkpoints" / f"best-{criterion}.pt"
        model = _load_weights(ctx, method, source)
        if type(method).finalize is Method.finalize:
            _link(source, target)  # nothing to finalize: the same weights, stored once
        else:
            torch.manual_seed(derive_seed(config.seed, epoch, _FINALIZE))
            model = method.finalize(model)
            _save(_weights(model, method, epoch), target)
        finals[epoch] = target
        probs = {s: ctx.predict(model, s) for s in ("val", "test")}
        by_epoch[epoch] = {
            "probs": probs,
            "metrics": {
                s: score_split(
                    ctx.data,
                    s,
                    probs[s],
                    bootstrap=config.bootstrap,
                    seed=config.seed,
                    rows=ctx.val_rows if s == "val" else None,
                )
                for s in ("val", "test")
            },
        }
    primary = config.primary_criterion
    chosen = by_epoch[int(best[primary]["epoch"])]
    with atomic_directory(run / "predictions", overwrite=True) as folder:
        for s in ("val", "test"):
            predictions_table(ctx.data, s, chosen["probs"][s]).to_parquet(
                folder / f"{s}.parquet", index=False
            )
    epochs = {c: int(best[c]["epoch"]) for c in config.select_by}
    metrics = {
        "selection": {"criterion": primary, "epoch": epochs[primary], "by_criterion": epochs},
        "val": chosen["metrics"]["val"],
        "test": chosen["metrics"]["test"],
        "by_criterion": {c: {"epoch": e, **by_epoch[e]["metrics"]} for c, e in epochs.items()},
        "group_names": list(ctx.data.scheme.group_names),
        "attribute_names": list(ctx.data.scheme.attribute_names),
        "val_rows_scored": len(ctx.val) if ctx.val_rows is None else len(ctx.val_rows),
        "method_report": method.run_report(),
    }
    _write_json(run / "metrics.json", jsonable(metrics))

"""The single training loop: one model, one method, checkpoints, resume, selection.

``train(config)`` writes a run folder (contract 3.4, see :mod:`unshortcut.runs`).
Criteria that pick the same epoch share one weights file (hard links), so six criteria
cost at most six copies of the weights and usually one or two.

Honest selection: every choice (best epoch per criterion, auxiliary models' epochs)
reads validation metrics only. The test split is not even loaded until training is
over, and it is scored once per selected checkpoint, at the end.

Determinism: each epoch draws its batches from ``np.random.default_rng([seed, epoch])``
and its augmentation and torch RNG from seeds derived from ``(seed, epoch)``, so a run
resumed from ``last.pt`` (saved at epoch boundaries) continues bit for bit like an
uninterrupted one on the same machine. Auxiliary models (JTT's identification model,
GERNE's biased model) run through the same epochs on random streams of their own.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unshortcut import distributed
from unshortcut.atomic import (
    LeftoverWarning,
    atomic_directory,
    clean_leftovers,
    move_into_place,
)
from unshortcut.config import TrainConfig
from unshortcut.data import Augmentation, SplitData, augmentation_generator
from unshortcut.errors import UnshortcutError
from unshortcut.event_log import EventLog
from unshortcut.inference import (
    RunData,
    decodability,
    features,
    infer,
    load_run_data,
    log_probabilities,
    method_splits,
    predictions_table,
    resolve_device,
    score_split,
)
from unshortcut.methods import Method, Optimizers, get_method
from unshortcut.metrics import selection_value
from unshortcut.rows import Batch
from unshortcut.runs import (
    CHECKPOINTS,
    LAST,
    RunFolderPlan,
    build_run_model,
    copy_run,
    link,
    load_checkpoint,
    plan_run_folder,
    read_json,
    resolved_config,
    save_checkpoint,
    settle_partial,
    write_checksums,
    write_history,
    write_json,
)
from unshortcut.stain import check_brightfield

# Separate random streams (the third seed word) so that nothing shares draws.
_MAIN, _AUX, _INIT, _FINALIZE = 0, 1, 2, 3

Schedulers = dict[str, torch.optim.lr_scheduler.LRScheduler]


def derive_seed(*words: int) -> int:
    """A 62-bit seed that depends on every word (numpy's SeedSequence mixing)."""
    return int(np.random.default_rng(list(words)).integers(2**62))


class TrainingDiverged(UnshortcutError):
    """The loss became NaN or infinite."""


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
    optimizers: Optimizers,
    *,
    epoch: int,
    seed: int,
    stream: int,
    augmentation: Augmentation | None,
    prefetch: bool,
    on_step: Callable[[int, int], None] | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """One epoch of the method's batches; returns the mean of each loss term.

    The batches of an epoch are drawn up front (they depend only on ``(seed, epoch)``),
    which fixes the step count for progress bars and makes prefetching safe.
    """
    rng = np.random.default_rng([seed, epoch] if stream == _MAIN else [seed, epoch, stream])
    indices = list(method.epoch_batches(epoch, rng))
    generator = augmentation_generator(seed, epoch, stream)
    torch.manual_seed(derive_seed(seed, epoch, stream))  # dropout and the like
    model.train()
    sums: dict[str, float] = defaultdict(float)
    for step, batch in enumerate(
        loader.batches(indices, augmentation, generator, prefetch=prefetch)
    ):
        with torch.autocast(loader.device.type, dtype=torch.bfloat16, enabled=bf16):
            terms = method.train_step(model, batch, optimizers)
        loss = _agreed_loss(terms["loss"])
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training diverged: the loss is {loss} at epoch {epoch}, step {step} "
                f"({_divergence_cause(batch)})"
            )
        for name, value in terms.items():
            sums[name] += value
        if on_step is not None:
            on_step(step + 1, len(indices))
    return _epoch_means(sums, len(indices))


def _agreed_loss(loss: float) -> float:
    """The step's loss, non-finite on every rank when it is on any (so all stop together)."""
    if distributed.world() == 1:
        return loss
    bad = distributed.all_reduce_sum(torch.tensor([0.0 if math.isfinite(loss) else 1.0]))
    return math.nan if bad.item() else loss


def _epoch_means(sums: dict[str, float], steps: int) -> dict[str, float]:
    """Mean of each term over the epoch's steps; averaged over ranks, each rank's term is
    its share of the global batch mean (``distributed.global_mean``)."""
    names = sorted(sums)
    totals = torch.tensor([sums[n] for n in names], dtype=torch.float64)
    totals = distributed.all_reduce_sum(totals) / distributed.world()
    return {n: float(t) / max(steps, 1) for n, t in zip(names, totals, strict=True)}


def _divergence_cause(batch: Batch) -> str:
    """What to do about a non-finite loss: bad inputs are not fixed by a lower rate."""
    if not torch.isfinite(batch.x).all():
        return (
            "the batch holds NaN or infinite pixel values: the patch set is damaged or was "
            "made from such images; `unshortcut check PATCHES` finds them"
        )
    return "try a lower --lr"


@dataclass
class EpochEnd:
    """What the loop knows when an epoch is over."""

    epoch: int
    terms: dict[str, float]
    """Mean of each loss term over the epoch's steps."""
    lr: float
    """The model optimizer's learning rate during the epoch."""
    stop: str | None
    """Why the method ends training after this epoch, if it does."""


def run_epochs(
    ctx: LoopContext,
    model: nn.Module,
    method: Method,
    optimizers: Optimizers,
    schedulers: Schedulers,
    epochs: Iterable[int],
    *,
    stream: int,
    after_epoch: Callable[[EpochEnd], None],
    on_step: Callable[[int, int], None] | None = None,
) -> None:
    """The epochs of one model: train, method bookkeeping, schedules, then ``after_epoch``.

    Used for the run's model and for every auxiliary model alike; ends early when the
    method gives a stop reason (after ``after_epoch`` has recorded it). Under data
    parallelism the training steps see the model wrapped for it (``distributed.wrap``).
    """
    train_model = distributed.wrap(model, ctx.device)
    for epoch in epochs:
        terms = train_epoch(
            train_model,
            method,
            ctx.data.loaders["train"],
            optimizers,
            epoch=epoch,
            seed=ctx.seed,
            stream=stream,
            augmentation=ctx.augmentation,
            prefetch=ctx.config.prefetch,
            on_step=on_step,
            bf16=ctx.config.uses_bf16(ctx.device.type),
        )
        method.on_epoch_end(epoch, model, terms)
        lr = next(iter(optimizers.values())).param_groups[0]["lr"]
        for scheduler in schedulers.values():
            scheduler.step()
        stop = method.stop_reason()
        after_epoch(EpochEnd(epoch, terms, lr, stop))
        if stop is not None:
            return


class LoopContext:
    """The :class:`~unshortcut.methods.base.TrainContext` the loop offers to methods."""

    def __init__(self, config: TrainConfig, data: RunData, device: torch.device) -> None:
        self.config = config
        self.data = data
        # The method's groups: the run's, or its own (method_attributes); rows are the same.
        splits = data.splits
        if config.method_attributes:
            splits = method_splits(data, config.method_attributes, config.taus)
        self.train = splits["train"]
        self.val = splits["val"]
        self.batch_size = config.batch_size
        self.seed = config.seed
        self.device = device
        self.pretrained = bool(config.pretrained)
        if config.hed_jitter > 0:
            check_brightfield(data.patchset.manifest, f"{data.source} (--hed-jitter)")
        self.augmentation = Augmentation.for_training(config.augment, config.hed_jitter)
        self._models = 0
        self._auxiliaries = 0
        # Validation rows scored for selection and metrics: all of them, unless the
        # method trains on some (DFR fits its head on half of the validation images).
        self.val_rows: np.ndarray | None = None

    def new_model(self) -> nn.Module:
        """A fresh model; the n-th call of a run always gets the same initial weights."""
        self._models += 1
        patchset = self.data.patchset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self._models, _INIT))
            model = build_run_model(
                self.config,
                self.config.hp,
                self.train.n_classes,
                patchset.channels,
                patchset.input_size,
                pretrained=True,
            )
        model = model.to(self.device)
        if self.config.uses_channels_last(self.device.type):
            model = model.to(memory_format=torch.channels_last)
        return model

    def make_optimizer(
        self,
        params: Iterable[nn.Parameter],
        lr_factor: float = 1.0,
        weight_decay_factor: float = 1.0,
    ) -> torch.optim.Optimizer:
        config = self.config
        lr, weight_decay = config.lr * lr_factor, config.weight_decay * weight_decay_factor
        if config.optimizer == "sgd":
            return torch.optim.SGD(
                list(params), lr=lr, momentum=config.momentum, weight_decay=weight_decay
            )
        return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)

    def setup(
        self,
        method: Method,
        model: nn.Module,
        epochs: int,
        lr_factor: float = 1.0,
        weight_decay_factor: float = 1.0,
    ) -> tuple[Optimizers, Schedulers]:
        """The method's extra modules on the device; its optimizers (learning rate and
        weight decay scaled by the factors) and their schedules over ``epochs``."""
        extra = method.extra_modules()
        if extra is not None:
            extra.to(self.device)
        optimizers = method.optimizers(model)
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] *= lr_factor
                group["weight_decay"] *= weight_decay_factor
        schedulers = {
            name: make_scheduler(opt, self.config.schedule, epochs)
            for name, opt in optimizers.items()
        }
        return optimizers, schedulers

    def predict(self, model: nn.Module, split: str) -> np.ndarray:
        """Class probabilities ``(N, K)`` of every row of ``split``."""
        return np.exp(self.log_probabilities(model, split))

    def log_probabilities(self, model: nn.Module, split: str) -> np.ndarray:
        bf16 = self.config.uses_bf16(self.device.type)
        return log_probabilities(model, self.data.loaders[split], self.config.prefetch, bf16)

    def features(self, model: nn.Module, split: str) -> np.ndarray:
        bf16 = self.config.uses_bf16(self.device.type)
        return features(model, self.data.loaders[split], self.config.prefetch, bf16)

    def validation_metrics(self, model: nn.Module) -> dict[str, Any]:
        """Validation metrics without bootstrap (cheap enough for every epoch)."""
        return score_split(
            self.data,
            "val",
            self.log_probabilities(model, "val"),
            bootstrap=0,
            seed=self.seed,
            rows=self.val_rows,
        )

    def fit_auxiliary(
        self,
        method: Method,
        *,
        epochs: int,
        lr_factor: float = 1.0,
        weight_decay_factor: float = 1.0,
        select_by: str = "last",
    ) -> nn.Module:
        self._auxiliaries += 1
        stream = _AUX * 1000 + self._auxiliaries
        model = self.new_model()
        optimizers, schedulers = self.setup(method, model, epochs, lr_factor, weight_decay_factor)
        method.prepare()
        best: list[Any] = []

        def keep_best(end: EpochEnd) -> None:
            if select_by == "last":
                return
            value = selection_value(self.validation_metrics(model), select_by)
            if not best or value > best[0]:
                best[:] = [value, copy.deepcopy(model.state_dict())]

        run_epochs(
            self, model, method, optimizers, schedulers, range(epochs), stream=stream,
            after_epoch=keep_best,
        )  # fmt: skip
        if best:
            model.load_state_dict(best[1])
        return model.eval()


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

    def remove(self, task: Any) -> None:
        if self.bar is not None and task is not None:
            self.bar.remove_task(task)


# --------------------------------------------------------------------------- train


@dataclass
class _LoopState:
    """What last.pt holds besides weights and optimizer states."""

    history: list[dict[str, Any]]
    best: dict[str, dict[str, Any]]
    start: int
    stopped: str | None


def training_data(
    config: TrainConfig, device: torch.device, splits: tuple[str, ...] = ("train", "val")
) -> RunData:
    """The patch set as ``config`` trains on it: groups, normalisation and robust-AUROC
    bins fitted on its training split; ``splits`` prepared."""
    return load_run_data(
        config.patches,
        device=device,
        splits=splits,
        attributes=config.attributes,
        taus=config.taus,
        normalize=config.normalize,
        channels_last=config.uses_channels_last(device.type),
        stain_normalization=config.stain_normalization,
    )


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int], None] | None = None,
) -> Path:
    """Train ``config.method`` on ``config.patches`` into ``config.out``; returns the run folder.

    ``resume`` continues the run in ``config.out`` (or its unfinished replacement
    ``OUT.partial``) from its last checkpoint; more ``epochs`` than it was started with
    extend it. ``overwrite`` replaces a used folder: the new run is built in
    ``OUT.partial`` and swapped in only when finished, so a failed or killed overwrite
    keeps the old run (and ``resume`` continues the new one). Extending a finished run
    goes through ``OUT.partial`` the same way.

    ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is on disk (sweeps
    report progress with it; tests kill runs with it).
    """
    device = distributed.init_from_env(resolve_device(config.device))
    main = distributed.is_main()  # the one writer under data parallelism
    if main:
        settle_partial(config.out)
    distributed.barrier()
    plan = plan_run_folder(config, resume, overwrite)
    run = plan.work
    with reproducible(config, device):
        data = training_data(config, device)
        ctx = LoopContext(config, data, device)
        method = get_method(config.method)(ctx, **config.hp)
        ctx.val_rows = _selection_rows(method, len(ctx.val))
        model = ctx.new_model()
        # Bad input has been refused by now: only then is anything written or removed.
        if main:
            _prepare_work_folder(plan)
        distributed.barrier()
        optimizers, schedulers = ctx.setup(method, model, config.epochs)
        if plan.checkpoint:
            state = _restore(run, device, model, method, optimizers, schedulers)
            if config.epochs != plan.saved_epochs and main:
                saved = read_json(run / "config.json")
                write_json(run / "config.json", {**saved, "epochs": config.epochs})
        else:
            patchset = data.patchset
            resolved = resolved_config(
                config,
                method.hp,
                data.scheme,
                data.normalization,
                data.robust_bins,
                patchset.channels,
                patchset.input_size,
            )
            if main:
                write_json(run / "config.json", resolved)
            method.prepare()
            state = _LoopState([], {}, 0, None)
        if main:
            write_history(run, state.history)
        if state.stopped is None:
            _run_main_epochs(ctx, run, model, method, optimizers, schedulers, state,
                             progress and main, on_epoch_end)  # fmt: skip
        _finish(run, ctx, method, state)
        distributed.barrier()
    if main and run != plan.out:
        move_into_place(run, plan.out)
    distributed.barrier()
    return plan.out


def _prepare_work_folder(plan: RunFolderPlan) -> None:
    """Remove an abandoned replacement, copy a finished run that is being extended, make
    the folder training writes to, and clear leftovers of killed runs around it."""
    if plan.discard is not None:
        shutil.rmtree(plan.discard)
        warnings.warn(
            f"{plan.discard}: discarded an unfinished run that was to replace {plan.out}",
            stacklevel=3,
        )
    if plan.copy_finished:
        copy_run(plan.out, plan.work)
    plan.work.mkdir(parents=True, exist_ok=True)
    # Temporaries of a run killed mid-write (a checkpoint that later epochs may never
    # rewrite): removed now, and said.
    for folder in (plan.out.parent, plan.work, plan.work / CHECKPOINTS):
        for text in clean_leftovers(folder):
            warnings.warn(text, LeftoverWarning, stacklevel=3)


def _apply_schedule(optimizers: Optimizers, schedules: Schedulers) -> None:
    """Set each optimizer's rate to what its restored schedule gives for the next epoch.

    After a plain resume this is the rate the checkpoint holds already (the same
    expression ``LambdaLR.step`` evaluated); after ``--epochs`` raised it follows the
    schedule over the new total (the epochs already trained keep the rates they had).
    """
    for name, schedule in schedules.items():
        rates = [
            base * factor(schedule.last_epoch)
            for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas, strict=True)
        ]
        for group, rate in zip(optimizers[name].param_groups, rates, strict=True):
            group["lr"] = rate
        schedule._last_lr = rates  # what get_last_lr() reports


def _restore(
    run: Path,
    device: torch.device,
    model: nn.Module,
    method: Method,
    optimizers: Optimizers,
    schedulers: Schedulers,
) -> _LoopState:
    state = load_checkpoint(run / CHECKPOINTS / LAST, device)
    _load_weights(state, model, method)
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(state["schedulers"][name])
    _apply_schedule(optimizers, schedulers)
    method.load_state_dict(state["method"])
    return _LoopState(state["history"], state["best"], state["epoch"] + 1, state["stopped"])


def _run_main_epochs(
    ctx: LoopContext,
    run: Path,
    model: nn.Module,
    method: Method,
    optimizers: Optimizers,
    schedulers: Schedulers,
    state: _LoopState,
    progress: bool,
    on_epoch_end: Callable[[int], None] | None,
) -> None:
    config = ctx.config
    events = EventLog(run / "tensorboard", config.tensorboard and distributed.is_main())
    with _Progress(progress) as bar, events:
        epochs_task = bar.task("epochs", config.epochs, completed=state.start)
        steps_task = [bar.task(f"epoch {state.start}", method.steps_per_epoch())]

        def after_epoch(end: EpochEnd) -> None:
            val = ctx.validation_metrics(model)
            events.epoch(end.epoch, end.terms, end.lr, val)
            line: dict[str, Any] = {
                "epoch": end.epoch,
                "train_loss": end.terms["loss"],
                "train": end.terms,
                "lr": end.lr,
                "val": val,
            }
            if end.stop is not None:
                line["stopped"] = state.stopped = end.stop
            state.history.append(line)
            weights = _weights(model, method, end.epoch)
            written = _update_best(config, state.best, val, end.epoch)
            if distributed.is_main():
                write_history(run, state.history)
                _save_best(run, written, weights)
                save_checkpoint(
                    {
                        **weights,
                        "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                        "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                        "method": method.state_dict(),
                        "history": state.history,
                        "best": state.best,
                        "stopped": end.stop,
                    },
                    run / CHECKPOINTS / LAST,
                )
            bar.remove(steps_task[0])
            bar.update(
                epochs_task,
                advance=1,
                description=f"epochs (loss {end.terms['loss']:.3f}, "
                f"val {config.primary_criterion} {_fmt(val, config.primary_criterion)})",
            )
            if end.epoch + 1 < config.epochs and end.stop is None:
                steps_task[0] = bar.task(f"epoch {end.epoch + 1}", method.steps_per_epoch())
            if on_epoch_end is not None:
                on_epoch_end(end.epoch)

        def on_step(done: int, total: int) -> None:
            bar.update(steps_task[0], completed=done, total=total)

        try:
            run_epochs(
                ctx, model, method, optimizers, schedulers, range(state.start, config.epochs),
                stream=_MAIN, after_epoch=after_epoch, on_step=on_step,
            )  # fmt: skip
        except TrainingDiverged as error:
            done = len(state.history)
            kept = (
                f"the last good checkpoint (epoch {done - 1}) is {run}/{CHECKPOINTS}/{LAST}"
                if done
                else "no epoch finished, so there is no checkpoint"
            )
            raise TrainingDiverged(f"{run}: {error}; {kept}") from None


def _fmt(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else f"{value:.3f}"


def _weights(model: nn.Module, method: Method, epoch: int) -> dict[str, Any]:
    extra = method.extra_modules()
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "extra": None if extra is None else extra.state_dict(),
    }


def _load_weights(state: dict[str, Any], model: nn.Module, method: Method) -> None:
    model.load_state_dict(state["model"])
    extra = method.extra_modules()
    if extra is not None and state["extra"] is not None:
        extra.load_state_dict(state["extra"])


def _update_best(
    config: TrainConfig, best: dict[str, dict[str, Any]], val: dict[str, Any], epoch: int
) -> list[str]:
    """Keep, per criterion, the best validation epoch (ties: the earlier); returns the
    criteria whose best epoch is this one."""
    improved = []
    for criterion in config.select_by:
        value = selection_value(val, criterion)
        if criterion in best and not value > best[criterion]["value"]:
            continue
        best[criterion] = {"epoch": epoch, "value": value}
        improved.append(criterion)
    return improved


def _save_best(run: Path, criteria: list[str], weights: dict[str, Any]) -> None:
    """best-<c>.pt for each criterion: the weights stored once, the others hard links."""
    targets = [run / CHECKPOINTS / f"best-{c}.pt" for c in criteria]
    if targets:
        save_checkpoint(weights, targets[0])
    for target in targets[1:]:
        link(targets[0], target)


def _selection_rows(method: Method, n_val: int) -> np.ndarray | None:
    """Validation rows left for selection once the method's own rows are removed."""
    reserved = method.reserved_val_rows()
    if not len(reserved):
        return None
    return np.setdiff1d(np.arange(n_val), reserved)


def _finish(run: Path, ctx: LoopContext, method: Method, state: _LoopState) -> None:
    """Finalize and score each selected checkpoint once; then write predictions and metrics.

    Every rank computes (finalize and scoring are deterministic and their inference is
    gathered); rank 0 writes.
    """
    config, best = ctx.config, state.best
    main = distributed.is_main()
    distributed.barrier()  # rank 0's best-<c>.pt files are on disk
    ctx.data.load("test")
    by_epoch: dict[int, dict[str, Any]] = {}
    finals: dict[int, Path] = {}
    for criterion in config.select_by:
        epoch = int(best[criterion]["epoch"])
        target = run / CHECKPOINTS / f"final-{criterion}.pt"
        if epoch in by_epoch:
            if main:
                link(finals[epoch], target)
            continue
        source = run / CHECKPOINTS / f"best-{criterion}.pt"
        model = ctx.new_model()
        _load_weights(load_checkpoint(source, ctx.device), model, method)
        if type(method).finalize is Method.finalize:
            if main:
                link(source, target)  # nothing to finalize: the same weights, stored once
        else:
            torch.manual_seed(derive_seed(config.seed, epoch, _FINALIZE))
            model = method.finalize(model)
            if main:
                save_checkpoint(_weights(model, method, epoch), target)
        finals[epoch] = target
        bf16 = config.uses_bf16(ctx.device.type)
        inferred = {
            s: infer(model, ctx.data.loaders[s], config.prefetch, bf16) for s in ("val", "test")
        }
        by_epoch[epoch] = {
            "inferred": inferred,
            "metrics": {
                s: score_split(
                    ctx.data,
                    s,
                    inferred[s].log_probs,
                    bootstrap=config.bootstrap,
                    seed=config.seed,
                    rows=ctx.val_rows if s == "val" else None,
                    pixel_counts=inferred[s].pixel_counts,
                )
                for s in ("val", "test")
            },
            "decodability": decodability(
                ctx.data, model, seed=config.seed, prefetch=config.prefetch
            ),
        }
    if not main:
        return
    primary = config.primary_criterion
    chosen = by_epoch[int(best[primary]["epoch"])]
    reserved = method.reserved_val_rows()
    with atomic_directory(run / "predictions", overwrite=True) as folder:
        for s in ("val", "test"):
            inferred = chosen["inferred"][s]
            predictions_table(
                ctx.data,
                s,
                inferred.log_probs,
                reserved if s == "val" else None,
                inferred.pixel_counts,
            ).to_parquet(folder / f"{s}.parquet", index=False)
    epochs = {c: int(best[c]["epoch"]) for c in config.select_by}
    metrics = {
        "selection": {"criterion": primary, "epoch": epochs[primary], "by_criterion": epochs},
        "val": chosen["metrics"]["val"],
        "test": chosen["metrics"]["test"],
        "by_criterion": {
            c: {"epoch": e, **by_epoch[e]["metrics"], "decodability": by_epoch[e]["decodability"]}
            for c, e in epochs.items()
        },
        "decodability": chosen["decodability"],
        "group_names": list(ctx.data.scheme.group_names),
        "attribute_names": list(ctx.data.scheme.attribute_names),
        "val_rows_scored": len(ctx.val) if ctx.val_rows is None else len(ctx.val_rows),
        "stopped_early": state.stopped,
        "method_report": method.run_report(),
    }
    write_checksums(run)
    write_json(run / "metrics.json", metrics)

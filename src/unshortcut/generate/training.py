"""Train the conditional generator into a run folder, resumably; load it back to sample.

``train_generator(config)`` writes::

    GEN_RUN/config.json          resolved config + fitted conditions + pixel scaling + input shape
    GEN_RUN/history.jsonl        one line per epoch: loss, validation denoising loss, lr, seconds
    GEN_RUN/checkpoints/last.pt  model, EMA model, optimizer, lr schedule, history (every epoch)
    GEN_RUN/generator.pt         the EMA weights, written when the last epoch is done

The generator learns the *real* training rows only (``split == "train"`` and not
``synthetic``): generated patches never teach the next generator, and validation and
test patches are never seen (the validation denoising loss is reported, never used
to choose anything).

Determinism: epoch ``e`` draws its batch order and condition dropout from
``numpy.random.default_rng([seed, e])`` and its noise, time steps and flips from a
torch generator seeded from ``(seed, e)``, so a run resumed from ``last.pt`` (saved
at epoch boundaries) continues exactly like an uninterrupted one on the same machine.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from unshortcut import __version__
from unshortcut.atomic import atomic_write_bytes, atomic_write_text
from unshortcut.errors import UnshortcutError
from unshortcut.generate.conditioning import ConditionEncoder, fit_conditions
from unshortcut.generate.config import RESUME_FREE_FIELDS, GeneratorConfig, resolve_device
from unshortcut.generate.diffusion import (
    ddim_sample,
    sampling_scheduler,
    training_scheduler,
    training_target,
)
from unshortcut.generate.model import ConditionalUNet, check_input_size
from unshortcut.generate.scaling import PixelScaling, masks_forward
from unshortcut.tiling.patchset import PatchSet

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"
LAST_CHECKPOINT = "checkpoints/last.pt"
WEIGHTS_FILE = "generator.pt"
# Validation rows whose denoising loss is tracked each epoch (fixed noise and steps).
VAL_ROWS = 256
# Derived seeds are (seed, _STREAMS, stream, ...): never equal to an epoch's (seed, epoch).
_STREAMS = 0x6E4
_INIT, _TRAIN, _VAL, _SAMPLE = 0, 1, 2, 3


def derive_seed(*words: int) -> int:
    """A 62-bit seed that depends on every word (numpy's SeedSequence mixing)."""
    return int(np.random.default_rng(list(words)).integers(2**62))


def real_rows(patchset: PatchSet, split: str) -> np.ndarray:
    """Pixel-store positions of the split's real (not generated) patches."""
    rows = patchset.rows(split)
    synthetic = patchset.table["synthetic"].to_numpy().astype(bool)
    return rows[~synthetic[rows]]


@dataclass
class Generator:
    """A trained generator: conditions, pixel scaling and the EMA denoiser."""

    run: Path
    config: GeneratorConfig
    encoder: ConditionEncoder
    scaling: PixelScaling
    model: nn.Module
    input_size: int
    image_channels: int
    device: torch.device

    @property
    def channels(self) -> int:
        """Image channels plus the mask channel when the generator makes masks."""
        return self.image_channels + int(self.config.with_mask)

    def sample(
        self,
        conditions: np.ndarray,
        *,
        seed: int,
        steps: int | None = None,
        guidance_scale: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Samples in [-1, 1], ``(N, channels, S, S)`` float32, for ``(N, K)`` conditions.

        Batch ``b`` of ``config.sample_batch`` rows starts from noise seeded by
        ``(seed, b)``, so the result does not depend on the device. ``on_batch(n)``
        is called with the number of samples finished after each batch.
        """
        steps = steps or self.config.sample_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if not 1 <= steps <= self.config.timesteps:
            raise UnshortcutError(f"--steps: must be in 1..{self.config.timesteps}, got {steps}")
        if scale < 0:
            raise UnshortcutError(f"--guidance: must be at least 0, got {scale}")
        scheduler = sampling_scheduler(
            self.config.timesteps, self.config.schedule, steps, self.config.prediction
        )
        size, batch = self.input_size, self.config.sample_batch
        out = np.empty((len(conditions), self.channels, size, size), np.float32)
        self.model.eval()
        for b, start in enumerate(range(0, len(conditions), batch)):
            stop = min(start + batch, len(conditions))
            generator = torch.Generator().manual_seed(derive_seed(seed, _STREAMS, _SAMPLE, b))
            noise = torch.randn((stop - start, self.channels, size, size), generator=generator)
            c = torch.from_numpy(np.asarray(conditions[start:stop], np.float32))
            x = ddim_sample(self.model, c.to(self.device), noise.to(self.device), scheduler, scale)
            out[start:stop] = x.float().cpu().numpy()
            if on_batch is not None:
                on_batch(stop)
        return out


# --------------------------------------------------------------------------- data


class TrainingData:
    """The real training rows as scaled tensors (image channels, then the mask channel)."""

    def __init__(
        self,
        patchset: PatchSet,
        rows: np.ndarray,
        encoder: ConditionEncoder,
        scaling: PixelScaling,
        with_mask: bool,
        source: str,
    ) -> None:
        self.patchset = patchset
        self.rows = rows
        self.scaling = scaling
        self.with_mask = with_mask
        table = patchset.table.iloc[rows].reset_index(drop=True)
        self.conditions = encoder.encode(table, source)

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: np.ndarray) -> torch.Tensor:
        """``(len(index), C [+1], S, S)`` float32 in [-1, 1]; one sorted read per store."""
        positions = self.rows[index]
        order = np.argsort(positions, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        x = self.scaling.forward(self.patchset.pixels[positions[order]])[inverse]
        if self.with_mask:
            masks = masks_forward(self.patchset.masks[positions[order]])[inverse]
            x = np.concatenate([x, masks], axis=1)
        return torch.from_numpy(np.ascontiguousarray(x))


def random_symmetry(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each patch under one of the square's 8 symmetries (orientation means nothing here)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    turns = torch.randint(0, 4, (len(x),), generator=generator)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    out = x.clone()
    for k in range(1, 4):
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(x[chosen], k, dims=(-2, -1))
    return out


def drop_conditions(
    conditions: np.ndarray, config: GeneratorConfig, rng: np.random.Generator
) -> np.ndarray:
    """Null (NaN) each condition with ``cond_dropout_each``, all of a row with ``cond_dropout``."""
    dropped = conditions.copy()
    each = rng.random(dropped.shape) < config.cond_dropout_each
    whole = rng.random(len(dropped)) < config.cond_dropout
    dropped[each | whole[:, None]] = np.nan
    return dropped


# --------------------------------------------------------------------------- run folder


def _save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _write_history(run: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(run / HISTORY_FILE, "".join(json.dumps(h) + "\n" for h in history))


def _check_folder(config: GeneratorConfig, resume: bool, overwrite: bool) -> bool:
    """Refuse unusable run folders (no side effects); True when there is a checkpoint."""
    out = config.out
    if resume and overwrite:
        raise UnshortcutError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise UnshortcutError(f"{out}: exists and is not a folder")
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise UnshortcutError(f"{out}: no generator run to resume (config.json is missing)")
        saved = read_run_config(out)["config"]
        current = {**config.to_json_dict(), "patches": str(Path(config.patches).resolve())}
        differ = sorted(
            k for k in current if k not in RESUME_FREE_FIELDS and saved.get(k) != current[k]
        )
        if differ:
            raise UnshortcutError(
                f"{out}: --resume with settings that differ from the run's config.json "
                f"({', '.join(differ)})"
            )
        return (out / LAST_CHECKPOINT).is_file()
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UnshortcutError(
            f"{out}: already holds files (pass --resume to continue the run there "
            "or --overwrite to replace it)"
        )
    return False


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _new_model(channels: int, encoder: ConditionEncoder, config: GeneratorConfig) -> nn.Module:
    """A fresh denoiser; its initial weights depend only on the seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, _STREAMS, _INIT))
        return ConditionalUNet(channels, encoder.conditions, config)


# --------------------------------------------------------------------------- train

OnStep = Callable[[int, int, int], None]
"""(epoch, steps done, steps in the epoch)."""


def train_generator(
    config: GeneratorConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: OnStep | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Train the generator of ``config.patches`` into ``config.out``; returns the run folder.

    ``on_epoch_end(history_line)`` is called after each epoch's checkpoint is on disk.
    """
    device = resolve_device(config.device)
    has_checkpoint = _check_folder(config, resume, overwrite)
    run = config.out
    patchset = PatchSet.open(config.patches)
    source = f"{config.patches} (train split)"
    rows = real_rows(patchset, "train")
    if not len(rows):
        raise UnshortcutError(f"{source}: no real (non-synthetic) training patches")
    check_input_size(patchset.input_size, config, str(config.patches))
    train_table = patchset.table.iloc[rows]
    encoder = ConditionEncoder(fit_conditions(train_table, config.conditions, source))
    scaling = PixelScaling.fit(patchset.pixels, rows, config.pixel_percentiles, config.seed)
    data = TrainingData(patchset, rows, encoder, scaling, config.with_mask, source)
    val_rows = real_rows(patchset, "val")[:VAL_ROWS]
    val = TrainingData(patchset, val_rows, encoder, scaling, config.with_mask, str(config.patches))
    channels = patchset.channels + int(config.with_mask)
    if not resume:
        if overwrite and run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)

    with _threads(config.num_threads):
        model = _new_model(channels, encoder, config).to(device)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        warmup = max(config.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        history: list[dict[str, Any]] = []
        start = 0
        if has_checkpoint:
            state = torch.load(run / LAST_CHECKPOINT, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            history, start = state["history"], state["epoch"] + 1
        else:
            _write_json(run / CONFIG_FILE, _resolved(config, patchset, encoder, scaling, rows))
        _write_history(run, history)
        (run / WEIGHTS_FILE).unlink(missing_ok=True)  # stale once training continues

        noising = training_scheduler(config.timesteps, config.schedule, config.prediction)
        for epoch in range(start, config.epochs):
            began = time.perf_counter()
            loss = _train_epoch(
                model, ema, optimizer, schedule, noising, data, config, epoch, device, on_step
            )
            line = {
                "epoch": epoch,
                "loss": loss,
                "val_loss": _validation_loss(ema.module, noising, val, config, device),
                "lr": optimizer.param_groups[0]["lr"],
                "steps": schedule.last_epoch,
                "seconds": round(time.perf_counter() - began, 3),
            }
            history.append(line)
            _write_history(run, history)
            _save(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "history": history,
                },
                run / LAST_CHECKPOINT,
            )
            if on_epoch_end is not None:
                on_epoch_end(line)
        _save({"model": ema.module.state_dict()}, run / WEIGHTS_FILE)
    return run


def _train_epoch(
    model: nn.Module,
    ema: AveragedModel,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    noising: Any,
    data: TrainingData,
    config: GeneratorConfig,
    epoch: int,
    device: torch.device,
    on_step: OnStep | None,
) -> float:
    """One pass over the real training rows; returns the mean step loss."""
    rng = np.random.default_rng([config.seed, epoch])
    generator = torch.Generator().manual_seed(derive_seed(config.seed, _STREAMS, _TRAIN, epoch))
    order = rng.permutation(len(data))
    batches = [order[s : s + config.batch_size] for s in range(0, len(order), config.batch_size)]
    model.train()
    total = 0.0
    for step, index in enumerate(batches):
        x0 = data.load(index)
        if config.augment:
            x0 = random_symmetry(x0, generator)
        conditions = torch.from_numpy(drop_conditions(data.conditions[index], config, rng))
        t = torch.randint(0, config.timesteps, (len(index),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        x_t = noising.add_noise(x0, noise, t)
        target = training_target(noising, x0, noise, t)
        loss = nn.functional.mse_loss(model(x_t, t, conditions.to(device)), target)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise UnshortcutError(
                f"{config.out}: generator training diverged (loss {value} at epoch {epoch}, "
                f"step {step}); try a lower lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        ema.update_parameters(model)
        total += value
        if on_step is not None:
            on_step(epoch, step + 1, len(batches))
    return total / len(batches)


@torch.no_grad()
def _validation_loss(
    model: nn.Module, noising: Any, val: TrainingData, config: GeneratorConfig, device: torch.device
) -> float | None:
    """Denoising loss of the EMA model on fixed validation rows, noise and time steps."""
    if not len(val):
        return None
    generator = torch.Generator().manual_seed(derive_seed(config.seed, _STREAMS, _VAL))
    x0 = val.load(np.arange(len(val)))
    t = torch.randint(0, config.timesteps, (len(val),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    conditions = torch.from_numpy(val.conditions)
    model.eval()
    total = 0.0
    for s in range(0, len(val), config.batch_size):
        part = slice(s, s + config.batch_size)
        x, n, steps = x0[part].to(device), noise[part].to(device), t[part].to(device)
        output = model(noising.add_noise(x, n, steps), steps, conditions[part].to(device))
        target = training_target(noising, x, n, steps)
        total += float(nn.functional.mse_loss(output, target, reduction="sum"))
    return total / noise.numel()


def _resolved(
    config: GeneratorConfig,
    patchset: PatchSet,
    encoder: ConditionEncoder,
    scaling: PixelScaling,
    rows: np.ndarray,
) -> dict[str, Any]:
    return {
        "config": {**config.to_json_dict(), "patches": str(Path(config.patches).resolve())},
        "conditions": encoder.to_list(),
        "scaling": scaling.to_dict(),
        "input": {
            "channels": patchset.channels,
            "size": patchset.input_size,
            "dtype": str(patchset.pixels.dtype),
        },
        "real_train_rows": len(rows),
        "unshortcut_version": __version__,
    }


# --------------------------------------------------------------------------- load


def read_run_config(run: Path) -> dict[str, Any]:
    """The resolved ``config.json`` of a generator run (one-line error when absent)."""
    path = Path(run) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UnshortcutError(f"{path}: not a generator run ({error})") from None
    if not isinstance(data, dict) or "conditions" not in data or "scaling" not in data:
        raise UnshortcutError(f"{path}: not a generator run's config.json")
    return data


def load_generator(run: Path | str, device: str = "auto") -> Generator:
    """The trained generator of a finished run, on ``device``."""
    run = Path(run)
    resolved = read_run_config(run)
    if not (run / WEIGHTS_FILE).is_file():
        raise UnshortcutError(
            f"{run}: training is unfinished (no {WEIGHTS_FILE}); continue it with "
            f"`unshortcut generate train {resolved['config']['patches']} --out {run} --resume`"
        )
    config = GeneratorConfig(**resolved["config"])
    encoder = ConditionEncoder.from_list(resolved["conditions"])
    target = resolve_device(device)
    channels = int(resolved["input"]["channels"])
    model = _new_model(channels + int(config.with_mask), encoder, config)
    state = torch.load(run / WEIGHTS_FILE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return Generator(
        run=run,
        config=config,
        encoder=encoder,
        scaling=PixelScaling.from_dict(resolved["scaling"]),
        model=model.to(target).eval(),
        input_size=int(resolved["input"]["size"]),
        image_channels=channels,
        device=target,
    )

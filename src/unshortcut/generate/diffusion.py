"""Noise schedule, training targets and DDIM sampling with classifier-free guidance.

MONAI's schedulers hold the schedule and the arithmetic: ``DDPMScheduler.add_noise``
gives ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` for training, and
``DDIMScheduler.step`` the deterministic DDIM update (eta = 0) for sampling. One
thing is set here: the sampling time steps. MONAI spaces them with a rounded
``linspace`` while its step goes back by ``T // steps``, so the two drift apart by a
step or so; here they are ``T - 1, T - 1 - k, ...`` with ``k = T // steps``
("trailing" spacing: the first step starts from the pure-noise end), and every step
lands exactly on the next one. The sample is the clean-image estimate of the last
step.

Guidance: ``eps = eps_uncond + w (eps_cond - eps_uncond)``, the unconditional
prediction coming from the all-null conditions; w = 1 is the plain conditional
model, w = 0 the unconditional one, w > 1 sharpens the conditioning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from unshortcut.generate.conditioning import null_conditions


def training_scheduler(timesteps: int, schedule: str, prediction: str = "epsilon") -> DDPMScheduler:
    """The forward (noising) process the model is trained on."""
    return DDPMScheduler(
        num_train_timesteps=timesteps, schedule=schedule, prediction_type=prediction
    )


def training_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the network learns to output: the noise, or the velocity
    ``sqrt(abar) eps - sqrt(1 - abar) x0``."""
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def sampling_scheduler(
    timesteps: int, schedule: str, steps: int, prediction: str = "epsilon"
) -> DDIMScheduler:
    """A DDIM sampler over ``steps`` evenly spaced time steps of the same schedule."""
    scheduler = DDIMScheduler(
        num_train_timesteps=timesteps,
        schedule=schedule,
        clip_sample=True,
        set_alpha_to_one=True,
        prediction_type=prediction,
    )
    scheduler.set_timesteps(steps)
    scheduler.timesteps = ddim_timesteps(timesteps, steps)
    return scheduler


def ddim_timesteps(timesteps: int, steps: int) -> torch.Tensor:
    """``T - 1, T - 1 - k, ..., T - 1 - (steps - 1) k`` with ``k = T // steps`` (int64)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in 1..{timesteps}, got {steps}")
    stride = timesteps // steps
    return (timesteps - 1 - stride * torch.arange(steps)).long()


def guided_epsilon(
    eps_conditional: torch.Tensor, eps_unconditional: torch.Tensor, scale: float
) -> torch.Tensor:
    """Classifier-free guidance; scale 0 returns the unconditional prediction exactly."""
    return eps_unconditional + scale * (eps_conditional - eps_unconditional)


@torch.no_grad()
def guided_prediction(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    conditions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The guided noise prediction: one conditional and one unconditional forward pass."""
    eps_conditional = model(x, t, conditions)
    unconditional = null_conditions(*conditions.shape).to(conditions.device)
    eps_unconditional = model(x, t, unconditional)
    return guided_epsilon(eps_conditional, eps_unconditional, scale)


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    conditions: torch.Tensor,
    noise: torch.Tensor,
    scheduler: DDIMScheduler,
    guidance_scale: float,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` (N, C, S, S) into samples for ``conditions`` (N, K) with DDIM.

    Deterministic given the noise (eta = 0). Returns the clean-image estimate of the
    last step, clipped to [-1, 1] by the scheduler.
    """
    x = noise
    estimate = noise
    steps = scheduler.timesteps
    for i, t in enumerate(steps):
        t_batch = torch.full((len(x),), int(t), dtype=torch.long, device=x.device)
        eps = guided_prediction(model, x, t_batch, conditions, guidance_scale)
        x, estimate = scheduler.step(eps, int(t), x)
        if on_step is not None:
            on_step(i + 1, len(steps))
    return estimate

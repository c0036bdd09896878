"""MIMM-X: keep every spurious attribute out of the task features by minimising mutual information.

Fay et al., "Avoiding shortcut-learning by mutual information minimization" (IEEE Access
2023) and its extension to several attributes, MIMM-X (arXiv 2511.22990). The model's
feature vector ``z`` is split into a *task part* (the first ``task_share`` of it: the only
part the class head reads, through the model option ``head_share``) and one part per
spurious attribute. Each attribute part has a head of its own: a classifier for a
categorical attribute (site, scanner: its category index), a regression on the
standardised raw value for a continuous one (tissue ratio, age: no threshold needed).
So the attribute information has a place to go, and the mutual information between the
parts pushes it out of the task part.

Mutual information per pair of parts is estimated with MINE (Belghazi et al. 2018): a
statistics network ``T(a, b)`` and the Donsker-Varadhan bound

    I(a; b) >= E_joint[T] - log E_marginal[e^T],

joint pairs being the batch's rows, marginal ones the rows with ``b`` shuffled among
the rows *of the same class* (``marginal="class"``, the default), which estimates the
conditional mutual information ``I(a; b | y)``. Why conditional: a shortcut is an
attribute that correlates with the label, so a task part that predicts the label
necessarily tells something about the attribute, and ``I(task; attribute)`` cannot fall
to zero without giving up the label: the unconditional term fights the task loss. Given
the label, the task part can hold nothing about the attribute, which is what a model
free of the shortcut looks like and what the within-class decodability probe measures.
``marginal="batch"`` shuffles over the whole batch (the original MIMM). The gradient
of ``log E[e^T]`` divides by a mini-batch mean, which biases it;
the moving average of ``E_marginal[e^T]`` replaces that denominator (the "moving-average
gradient correction").

Each step alternates, as MIMM does:

1. the estimators, on *detached* features, ascend their bounds with their own optimizer
   (``optimizers()["estimator"]``, Adam) and update their moving averages, for
   ``estimator_steps`` steps (each on a fresh shuffle of the batch: a stronger critic);
2. encoder and heads descend ``L_task + attribute_weight * sum L_attr + w * sum I``, the
   estimators frozen.

The weight ``w`` is set every step so that the MI term's gradient on the encoder output
``z`` has ``mi_ratio`` times the norm of the task loss's gradient there:
``||d(w I)/dz|| = mi_ratio ||dL_task/dz||``. Everything the encoder learns flows in
through ``dL/dz``, so one ratio means the same balance whatever the data, the loss scale
or the number of pairs, and measuring it there costs two backward passes through the
heads and critics only, not through the encoder.

The heads and statistics networks are one ``extra_modules()`` ModuleDict, checkpointed
with the model; the moving averages are buffers of the estimators, so they are
checkpointed (and a killed run resumes exactly) with them. Their sizes depend on the
model's feature size, so they are built when the loop hands over the model
(``optimizers``). Every loss term and each pair's MI estimate is logged per epoch.

Under data parallelism the marginal pairs are shuffled over the whole global batch, so
the features are gathered from every rank (``distributed.gather_batch``, with
gradients) and every rank computes the same MI terms, estimator step and moving
averages; the row losses are global-batch means. The permutation comes from a stream of
its own (seed and step count), so ranks agree and a resumed run draws the same ones.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from unshortcut import distributed
from unshortcut.errors import UnshortcutError
from unshortcut.methods.base import HParam, Method, Optimizers, TrainContext
from unshortcut.methods.registry import register
from unshortcut.rows import Batch, GroupedSplit

PAIRS: tuple[str, ...] = ("all", "task")
"""Which pairs of parts get an estimator: every pair, or the task part with each attribute."""
ESTIMATORS: tuple[str, ...] = ("mine", "gaussian")
"""How each pair's mutual information is estimated: MINE's trained critic, or in closed
form for a Gaussian with the rows' covariance (:func:`gaussian_mutual_information`)."""
MARGINALS: tuple[str, ...] = ("class", "batch")
"""Where the marginal pairs are shuffled: among the rows of one class (conditional MI
given the label) or over the whole batch."""
TASK = "task"
_EPS = 1e-12
_INIT_STREAM = 0x4D494D4D  # "MIMM": the seed word of the heads' and critics' initialisation
_SHUFFLE_STREAM = 0x53485546  # "SHUF": the seed word of the marginal pairs' permutations


def log_mean_exp(values: torch.Tensor) -> torch.Tensor:
    """``log mean(e^values)``, computed stably."""
    return torch.logsumexp(values, dim=0) - math.log(len(values))


class MutualInformationEstimator(nn.Module):
    """MINE for one pair of parts: statistics network and moving average of E_marginal[e^T]."""

    def __init__(self, dim_a: int, dim_b: int, hidden: int, decay: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim_a + dim_b, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self.decay = decay
        self.register_buffer("running_exp", torch.ones((), dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def statistics(
        self, a: torch.Tensor, b: torch.Tensor, shuffle: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T on the joint pairs ``(a_i, b_i)`` and on the marginal pairs ``(a_i, b_shuffle(i))``."""
        joint = self.net(torch.cat([a, b], dim=1)).squeeze(1)
        marginal = self.net(torch.cat([a, b[shuffle]], dim=1)).squeeze(1)
        return joint, marginal

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, shuffle: torch.Tensor, *, update: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrected objective, Donsker-Varadhan estimate in nats) on this batch.

        The objective ``E_joint[T] - E_marginal[e^T] / m`` with ``m`` the moving average
        (held constant) has the gradient of the DV bound with the batch mean of ``e^T``
        in its denominator replaced by ``m``. ``update`` first folds this batch's mean
        into ``m`` (the estimator's own step; the encoder's step leaves it alone).
        """
        joint, marginal = self.statistics(a, b, shuffle)
        log_mean = log_mean_exp(marginal)
        if update:
            batch_mean = log_mean.detach().double().exp()
            first = bool(self.updates == 0)
            self.running_exp.copy_(
                batch_mean
                if first
                else self.decay * self.running_exp + (1 - self.decay) * batch_mean
            )
            self.updates += 1
        scale = self.running_exp.clamp_min(_EPS).log().to(log_mean.dtype)
        objective = joint.mean() - torch.exp(log_mean - scale)
        return objective, (joint.mean() - log_mean).detach()


def gaussian_mutual_information(
    a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None, shrinkage: float
) -> torch.Tensor:
    """``I(a; b)`` of the Gaussian with the rows' correlation: ``(log det R_aa + log det
    R_bb - log det R) / 2``, conditional on ``groups`` when given (rows centred on their
    group's mean, the covariance pooled: ``I(a; b | group)``).

    Unlike MINE's critic, which the encoder can learn to fool on a batch of rows, this
    estimate has no parameters: any linear dependence left between the parts shows in it
    (for Gaussian parts it is the exact mutual information; otherwise the information
    carried by their correlation). ``shrinkage`` pulls the correlation matrix toward the
    identity, which keeps it invertible when a batch holds fewer rows than dimensions.
    """
    x = torch.cat([a, b], dim=1).double()
    if groups is None:
        x = x - x.mean(dim=0)
        dof = len(x) - 1
    else:
        onehot = F.one_hot(groups, int(groups.max()) + 1).double()
        counts = onehot.sum(dim=0)
        x = x - onehot @ ((onehot.T @ x) / counts.clamp_min(1.0)[:, None])
        dof = len(x) - int((counts > 0).sum())
    covariance = x.T @ x / max(dof, 1)
    scale = covariance.diagonal().clamp_min(_EPS).rsqrt()
    identity = torch.eye(len(covariance), dtype=x.dtype, device=x.device)
    correlation = (1 - shrinkage) * scale[:, None] * covariance * scale[None, :]
    correlation = correlation + shrinkage * identity

    def log_det(matrix: torch.Tensor) -> torch.Tensor:
        return 2 * torch.linalg.cholesky(matrix).diagonal().log().sum()

    k = a.shape[1]
    joint = log_det(correlation)
    return (0.5 * (log_det(correlation[:k, :k]) + log_det(correlation[k:, k:]) - joint)).to(a.dtype)


def permute_within(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation ``p`` of the rows with ``labels[p[i]] == labels[i]``: each
    class's rows shuffled among themselves (a class with one row keeps it in place)."""
    order = torch.arange(len(labels))
    for value in labels.unique(sorted=True):
        rows = (labels == value).nonzero().flatten()
        order[rows] = rows[torch.randperm(len(rows), generator=generator)]
    return order


def adaptive_weight(
    task_loss: torch.Tensor, mi: torch.Tensor, features: torch.Tensor, ratio: float
) -> float:
    """``w`` with ``||d(w mi)/d features|| = ratio ||d task_loss/d features||``.

    Gradients are taken with respect to ``features`` (a tensor both losses were computed
    from), keeping the graph for the step's own backward pass. 0 when the MI term has no
    gradient there. Under data parallelism ``features`` is a rank's share and the norms
    are those over the global batch (squared norms summed over ranks; both gradients
    carry the same factor there, so the ratio is the single-process one).
    """
    task_grad, mi_grad = (
        torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)[0]
        for loss in (task_loss, mi)
    )
    if mi_grad is None or task_grad is None:
        return 0.0
    squared = torch.stack([task_grad.double().pow(2).sum(), mi_grad.double().pow(2).sum()])
    task_norm, mi_norm = distributed.all_reduce_sum(squared).sqrt().tolist()
    return 0.0 if mi_norm < _EPS else ratio * task_norm / mi_norm


def part_sizes(n_features: int, head_features: int, n_attributes: int) -> list[int]:
    """Task part (what the head reads), then the rest split as evenly as possible."""
    rest = n_features - head_features
    if n_attributes < 1 or rest < n_attributes:
        raise UnshortcutError(
            f"method 'mimm': {n_features} features with {head_features} for the task leave "
            f"{rest} for {n_attributes} attribute part(s); lower task_share or use a wider model"
        )
    base, extra = divmod(rest, n_attributes)
    return [head_features] + [base + (1 if i < extra else 0) for i in range(n_attributes)]


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No gradients into ``module``'s parameters for the block (the encoder's step)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


@register
class MIMM(Method):
    """MIMM-X with one part and one head per attribute and a MINE estimator per pair."""

    name = "mimm"
    summary = "task and per-attribute feature parts kept apart by minimising their MINE estimate"
    needs_train_attributes = True
    hparams: ClassVar[dict[str, HParam]] = {
        "mi_ratio": HParam(
            0.5, 0.1, 2.0, log=True, help="MI term's gradient norm on the features / task's"
        ),
        "attribute_weight": HParam(
            1.0, 0.1, 3.0, log=True, help="weight of the attribute heads' losses"
        ),
        "estimator_lr": HParam(
            1e-3, 1e-4, 1e-2, log=True, help="Adam learning rate of the MINE estimators"
        ),
        "estimator": HParam(
            "mine", help="MI estimator: mine (a trained critic) or gaussian (closed form)"
        ),
        "shrinkage": HParam(
            0.1, help="gaussian: the correlation matrix shrunk by this share toward identity"
        ),
        "estimator_steps": HParam(
            1, help="estimator steps per training step (each on a fresh shuffle of the batch)"
        ),
        "task_share": HParam(0.5, help="share of the features the task head reads"),
        "pairs": HParam("all", help="estimated pairs: all (every pair of parts) or task"),
        "marginal": HParam(
            "class", help="marginal pairs shuffled within each class (MI given the label) or batch"
        ),
        "ema": HParam(0.99, help="decay of the moving average of E_marginal[e^T]"),
        "hidden": HParam(64, help="hidden units of each statistics network"),
    }

    @classmethod
    def check_hparams(cls, hp: dict[str, Any], train: GroupedSplit) -> None:
        if not train.bin_counts:
            raise UnshortcutError(
                f"method {cls.name!r}: needs at least one attribute to keep out of the task "
                "features (--attribute, e.g. tissue_ratio and site)"
            )
        if hp["pairs"] not in PAIRS:
            raise UnshortcutError(
                f"method {cls.name!r}: pairs={hp['pairs']!r} is not one of {PAIRS}"
            )
        if hp["marginal"] not in MARGINALS:
            raise UnshortcutError(
                f"method {cls.name!r}: marginal={hp['marginal']!r} is not one of {MARGINALS}"
            )
        if not 0.0 < float(hp["task_share"]) < 1.0:
            raise UnshortcutError(f"method {cls.name!r}: task_share must lie in (0, 1)")
        if float(hp["mi_ratio"]) < 0 or float(hp["attribute_weight"]) < 0:
            raise UnshortcutError(f"method {cls.name!r}: mi_ratio and attribute_weight are >= 0")
        if not 0.0 <= float(hp["ema"]) < 1.0 or int(hp["hidden"]) < 1:
            raise UnshortcutError(f"method {cls.name!r}: ema must lie in [0, 1), hidden >= 1")
        if hp["estimator"] not in ESTIMATORS:
            raise UnshortcutError(
                f"method {cls.name!r}: estimator={hp['estimator']!r} is not one of {ESTIMATORS}"
            )
        if not 0.0 <= float(hp["shrinkage"]) < 1.0:
            raise UnshortcutError(f"method {cls.name!r}: shrinkage must lie in [0, 1)")
        if int(hp["estimator_steps"]) < 1:
            raise UnshortcutError(f"method {cls.name!r}: estimator_steps must be >= 1")

    @classmethod
    def model_options(cls, hp: dict[str, Any]) -> dict[str, Any]:
        """The class head reads the task part only (``hp`` may leave defaults out)."""
        return {"head_share": float(hp.get("task_share", cls.hparams["task_share"].default))}

    def __init__(self, ctx: TrainContext, **hp: Any) -> None:
        super().__init__(ctx, **hp)
        train = ctx.train
        self.columns = train.attribute_names or tuple(
            f"attribute{j}" for j in range(len(train.bin_counts))
        )
        self.continuous = train.continuous or (False,) * len(train.bin_counts)
        values = train.values if train.values is not None else train.bins.astype(np.float64)
        mean, std = values.mean(axis=0), values.std(axis=0)
        std = np.where(std > 0, std, 1.0)  # training statistics: no peeking at val/test
        self.targets = [
            torch.as_tensor((values[:, j] - mean[j]) / std[j], dtype=torch.float32)
            if continuous
            else torch.as_tensor(train.bins[:, j], dtype=torch.long)
            for j, continuous in enumerate(self.continuous)
        ]
        names = (TASK, *self.columns)
        n_parts = len(names)
        pairs = itertools.combinations(range(n_parts), 2)
        self.pairs = [(i, j) for i, j in pairs if self.hp["pairs"] == "all" or i == 0]
        self.pair_names = [f"mi_{names[i]}_{names[j]}" for i, j in self.pairs]
        self.networks = nn.ModuleDict()
        self.sizes: list[int] = []
        self.steps = 0

    def extra_modules(self) -> nn.Module:
        """Heads and estimators (empty until ``optimizers`` has seen the model)."""
        return self.networks

    def _build(self, model: nn.Module) -> None:
        """Heads and statistics networks sized from the model's feature split."""
        if len(self.networks):
            return
        self.sizes = part_sizes(model.n_features, model.head_features, len(self.columns))
        train = self.ctx.train
        device = next(model.parameters()).device
        seed = int(np.random.default_rng([self.ctx.seed, _INIT_STREAM]).integers(2**62))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads = [
                nn.Linear(size, 1 if continuous else train.bin_counts[j])
                for j, (size, continuous) in enumerate(
                    zip(self.sizes[1:], self.continuous, strict=True)
                )
            ]
            estimators = [
                MutualInformationEstimator(
                    self.sizes[i], self.sizes[j], int(self.hp["hidden"]), float(self.hp["ema"])
                )
                for i, j in self.pairs
                if self.hp["estimator"] == "mine"
            ]
        self.networks["heads"] = nn.ModuleList(heads)
        self.networks["estimators"] = nn.ModuleList(estimators)
        self.networks.to(device)

    def optimizers(self, model: nn.Module) -> Optimizers:
        """The run's optimizer over model and heads; Adam over the estimators."""
        self._build(model)
        model_params = [*model.parameters(), *self.networks["heads"].parameters()]
        optimizers: Optimizers = {"model": self.ctx.make_optimizer(model_params)}
        if self.hp["estimator"] == "mine":
            optimizers["estimator"] = torch.optim.Adam(
                self.networks["estimators"].parameters(), lr=float(self.hp["estimator_lr"])
            )
        return optimizers

    def split(self, features: torch.Tensor) -> list[torch.Tensor]:
        """The task part, then one part per attribute (``(B, size)`` each)."""
        return list(torch.split(features, self.sizes, dim=1))

    def mutual_information(
        self, parts: list[torch.Tensor], shuffle: torch.Tensor, *, update: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sum of the corrected objectives over pairs, and each pair's DV estimate."""
        objectives, estimates = [], []
        for (i, j), estimator in zip(self.pairs, self.networks["estimators"], strict=True):
            objective, estimate = estimator(parts[i], parts[j], shuffle, update=update)
            objectives.append(objective)
            estimates.append(estimate)
        return torch.stack(objectives).sum(), estimates

    def attribute_losses(
        self, parts: list[torch.Tensor], index: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each head's loss on its part: cross-entropy (categorical) or squared error
        (continuous), averaged over the global batch."""
        rows = index.cpu()
        losses = []
        for j, head in enumerate(self.networks["heads"]):
            target = self.targets[j][rows].to(parts[0].device)
            output = head(parts[j + 1])
            if self.continuous[j]:
                row_losses = F.mse_loss(output.squeeze(1), target, reduction="none")
            else:
                row_losses = F.cross_entropy(output, target, reduction="none")
            losses.append(distributed.global_mean(row_losses))
        return losses

    def shuffle(self, labels: torch.Tensor) -> torch.Tensor:
        """This step's marginal pairs: a permutation of the global batch that keeps each
        row within its class (``marginal="class"``) or moves it anywhere."""
        seed = int(
            np.random.default_rng([self.ctx.seed, _SHUFFLE_STREAM, self.steps]).integers(2**62)
        )
        self.steps += 1
        generator = torch.Generator().manual_seed(seed)
        if self.hp["marginal"] == "batch":
            return torch.randperm(len(labels), generator=generator).to(labels.device)
        return permute_within(labels.cpu(), generator).to(labels.device)

    def train_step(
        self, model: nn.Module, batch: Batch, optimizers: Optimizers
    ) -> dict[str, float]:
        """Estimators up on detached parts, then encoder and heads down, MI weighted."""
        out = model.outputs(batch.x)
        features = out.backbone_features
        if features is None:
            raise UnshortcutError("method 'mimm': the model exposes no backbone features")
        parts = self.split(features)
        # MI is a statistic of the whole batch: its parts from every rank, in batch order.
        batch_parts = self.split(distributed.gather_batch(features))
        labels = distributed.gather_batch(batch.y)
        task_loss = distributed.global_mean(F.cross_entropy(out.logits, batch.y, reduction="none"))
        attribute_losses = self.attribute_losses(parts, batch.index)
        supervised = (
            task_loss + float(self.hp["attribute_weight"]) * torch.stack(attribute_losses).sum()
        )
        if self.hp["estimator"] == "mine":
            mi, estimates = self.mine_term(batch_parts, labels, optimizers["estimator"])
        else:
            mi, estimates = self.gaussian_term(batch_parts, labels)
        weight = adaptive_weight(task_loss, mi, features, float(self.hp["mi_ratio"]))
        optimizers["model"].zero_grad(set_to_none=True)
        (supervised + weight * mi).backward()
        distributed.average_unmanaged_gradients([optimizers["model"]])  # the heads
        optimizers["model"].step()
        # The objective as a number: the MI term at its estimate (MINE's corrected
        # objective only has the right gradient, not the right value).
        objective = supervised.detach() + weight * torch.stack(estimates).sum()
        terms = {
            "loss": float(objective),
            "loss_task": float(task_loss.detach()),
            "mi_weight": weight,
        }
        terms |= {
            f"loss_{column}": float(value.detach())
            for column, value in zip(self.columns, attribute_losses, strict=True)
        }
        terms |= {
            name: float(value) for name, value in zip(self.pair_names, estimates, strict=True)
        }
        return terms

    def mine_term(
        self, parts: list[torch.Tensor], labels: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """MINE: the critics step on the detached parts, then the MI term the encoder
        descends (critics frozen) and each pair's DV estimate before the encoder's step."""
        shuffle = self.shuffle(labels)  # the marginal pairs of the last critic step too
        detached = [p.detach() for p in parts]
        for step in range(int(self.hp["estimator_steps"])):
            marginal = shuffle if step == 0 else self.shuffle(labels)
            objective, estimates = self.mutual_information(detached, marginal, update=True)
            optimizer.zero_grad(set_to_none=True)
            (-objective).backward()  # the same on every rank: no averaging needed
            optimizer.step()
        with frozen(self.networks["estimators"]):  # the graph holds no critic gradients
            mi, _ = self.mutual_information(parts, shuffle, update=False)
        return mi, estimates

    def gaussian_term(
        self, parts: list[torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The closed-form MI of each pair (given the label with ``marginal="class"``)."""
        groups = labels if self.hp["marginal"] == "class" else None
        shrinkage = float(self.hp["shrinkage"])
        values = [
            gaussian_mutual_information(parts[i], parts[j], groups, shrinkage)
            for i, j in self.pairs
        ]
        return torch.stack(values).sum(), [v.detach() for v in values]

    def state_dict(self) -> dict[str, Any]:
        """The step count (the permutation stream); estimators are extra modules."""
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])

    def run_report(self) -> dict[str, Any]:
        """The feature split and the estimated pairs."""
        return {
            "parts": dict(zip((TASK, *self.columns), self.sizes, strict=False)),
            "pairs": [name.removeprefix("mi_") for name in self.pair_names],
        }

"""MIMM-X: the MINE estimator, the feature split and heads, adaptive scaling, training, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from test_methods_fake import N_FEATURES, FakeContext
from test_multi_attribute import write_site_patch_set
from test_train import kill_after_epoch
from unshortcut.config import TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.methods import GroupedSplit, get_method
from unshortcut.methods.mimm import (
    MutualInformationEstimator,
    adaptive_weight,
    gaussian_mutual_information,
    log_mean_exp,
    part_sizes,
    permute_within,
)
from unshortcut.models import Classifier, build_model
from unshortcut.train import train


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One torch thread: on a shared 2-core machine OpenMP teams of 2 stall on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mine_recovers_the_mutual_information_of_correlated_gaussians() -> None:
    """Two 2-d Gaussians with correlation rho per coordinate: I = -log(1 - rho^2) nats."""
    torch.manual_seed(0)
    rho, dim = 0.8, 2
    truth = -0.5 * dim * math.log(1 - rho**2)
    generator = torch.Generator().manual_seed(1)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, dim, generator=generator)
        noise = torch.randn(n, dim, generator=generator)
        return x, rho * x + math.sqrt(1 - rho**2) * noise

    estimator = MutualInformationEstimator(dim, dim, hidden=64, decay=0.99)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=1e-3)
    for _ in range(2000):
        x, y = sample(256)
        objective, _ = estimator(x, y, torch.randperm(256, generator=generator), update=True)
        optimizer.zero_grad()
        (-objective).backward()
        optimizer.step()
    x, y = sample(50_000)
    with torch.no_grad():
        _, estimate = estimator(x, y, torch.randperm(50_000, generator=generator), update=False)
    assert float(estimate) == pytest.approx(truth, rel=0.10)


def test_permute_within_keeps_every_row_in_its_class() -> None:
    labels = torch.tensor([0, 1, 1, 0, 2, 1, 0, 0, 1])
    generator = torch.Generator().manual_seed(3)
    orders = [permute_within(labels, generator) for _ in range(20)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(len(labels)))  # a permutation
        assert torch.equal(labels[order], labels)  # partners share the class
        assert order[4] == 4  # the only row of class 2 stays
    assert len({tuple(o.tolist()) for o in orders}) > 1  # and it is random


def _train_estimator(a: torch.Tensor, b: torch.Tensor, shuffle: Any, steps: int) -> float:
    """A MINE estimator trained on batches of 256 rows of (a, b), its DV estimate on all."""
    estimator = MutualInformationEstimator(a.shape[1], b.shape[1], hidden=32, decay=0.99)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        rows = torch.randint(len(a), (256,), generator=generator)
        objective, _ = estimator(a[rows], b[rows], shuffle(rows, generator), update=True)
        optimizer.zero_grad()
        (-objective).backward()
        optimizer.step()
    with torch.no_grad():
        _, estimate = estimator(a, b, shuffle(torch.arange(len(a)), generator), update=False)
    return float(estimate)


def test_shuffling_within_the_class_estimates_the_mutual_information_given_the_label() -> None:
    """a and b both follow the label y and nothing else: I(a; b) > 0 but I(a; b | y) = 0.
    With y as +-1 and noise 0.5 each reads y almost surely, so I(a; b) is close to
    H(y) = log 2 = 0.69 nats; the within-class estimate must stay near 0 while the
    whole-batch one finds it."""
    torch.manual_seed(0)
    n = 20_000
    y = torch.randint(2, (n,))
    a = (2.0 * y - 1)[:, None] + 0.5 * torch.randn(n, 1)
    b = (2.0 * y - 1)[:, None] + 0.5 * torch.randn(n, 1)
    batch = _train_estimator(a, b, lambda rows, g: torch.randperm(len(rows), generator=g), 600)
    within = _train_estimator(a, b, lambda rows, g: permute_within(y[rows], g), 600)
    assert batch > 0.4
    assert abs(within) < 0.05


def test_the_gaussian_estimate_is_the_mutual_information_of_correlated_gaussians() -> None:
    """Closed form, no training: on 50,000 rows of the 2-d Gaussians with correlation rho
    per coordinate, within 2% of -log(1 - rho^2) nats (and 0 for independent parts)."""
    generator = torch.Generator().manual_seed(4)
    rho, dim, n = 0.8, 2, 50_000
    x = torch.randn(n, dim, generator=generator)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, dim, generator=generator)
    estimate = float(gaussian_mutual_information(x, y, None, shrinkage=0.0))
    assert estimate == pytest.approx(-0.5 * dim * math.log(1 - rho**2), rel=0.02)
    independent = torch.randn(n, dim, generator=generator)
    assert abs(float(gaussian_mutual_information(x, independent, None, 0.0))) < 1e-3
    # Shrinkage pulls toward independence: a smaller, still positive, estimate.
    assert 0 < float(gaussian_mutual_information(x, y, None, 0.5)) < estimate


def test_the_gaussian_estimate_given_the_label_ignores_what_the_label_explains() -> None:
    """a and b follow y and nothing else: correlation 0.8 over the batch (I = 0.51 nats
    for a Gaussian), none within a class."""
    generator = torch.Generator().manual_seed(5)
    n = 50_000
    y = torch.randint(2, (n,), generator=generator)
    a = (2.0 * y - 1)[:, None] + 0.5 * torch.randn(n, 1, generator=generator)
    b = (2.0 * y - 1)[:, None] + 0.5 * torch.randn(n, 1, generator=generator)
    overall = float(gaussian_mutual_information(a, b, None, 0.0))
    assert overall == pytest.approx(-0.5 * math.log(1 - 0.8**2), rel=0.03)
    assert abs(float(gaussian_mutual_information(a, b, y, 0.0))) < 1e-3


def test_descending_the_gaussian_estimate_decorrelates_the_parts() -> None:
    """Its gradient removes the linear dependence: b learns to drop what it shares with a."""
    generator = torch.Generator().manual_seed(6)
    a = torch.randn(256, 3, generator=generator)
    mixing = torch.zeros(3, 2, requires_grad=True)
    noise = torch.randn(256, 2, generator=generator)
    with torch.no_grad():
        mixing += torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    optimizer = torch.optim.SGD([mixing], lr=0.1)
    first = None
    for _ in range(200):
        mi = gaussian_mutual_information(a, a @ mixing + noise, None, 0.1)
        first = float(mi.detach()) if first is None else first
        optimizer.zero_grad()
        mi.backward()
        optimizer.step()
    assert first > 0.5 and float(mi.detach()) < 0.05 * first


def test_moving_average_and_corrected_objective() -> None:
    """The first update takes the batch mean of e^T, later ones blend with the decay; the
    objective's gradient is the DV gradient with that average in the denominator."""
    torch.manual_seed(0)
    estimator = MutualInformationEstimator(1, 1, hidden=4, decay=0.9)
    a, b = torch.randn(8, 1), torch.randn(8, 1)
    shuffle = torch.arange(8).flip(0)
    joint, marginal = estimator.statistics(a, b, shuffle)
    first = float(marginal.detach().exp().mean())
    _, dv = estimator(a, b, shuffle, update=True)
    assert float(estimator.running_exp) == pytest.approx(first, rel=1e-6)
    expected_dv = (joint.mean() - log_mean_exp(marginal)).detach()
    assert float(dv) == pytest.approx(float(expected_dv), rel=1e-6)
    a2 = a + 1
    second = float(estimator.statistics(a2, b, shuffle)[1].detach().exp().mean())
    estimator(a2, b, shuffle, update=True)
    assert float(estimator.running_exp) == pytest.approx(0.9 * first + 0.1 * second, rel=1e-6)
    # Gradient of the objective w.r.t. the inputs: E[dT_joint] - E[e^T dT_marg] / m.
    a3 = a.clone().requires_grad_(True)
    objective, _ = estimator(a3, b, shuffle, update=False)
    (grad,) = torch.autograd.grad(objective, a3)
    m = float(estimator.running_exp)
    t_joint, t_marginal = estimator.statistics(a3, b, shuffle)
    expected = torch.autograd.grad(t_joint.mean() - t_marginal.exp().mean() / m, a3)[0]
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("ratio", [0.1, 1.0, 3.0])
def test_adaptive_weight_holds_the_gradient_ratio(ratio: float) -> None:
    torch.manual_seed(0)
    features = torch.randn(16, 6, requires_grad=True)
    task = (features[:, :3].sum(dim=1) ** 2).mean()
    mi = 0.01 * (features[:, :3] * features[:, 3:]).sum()
    weight = adaptive_weight(task, mi, features, ratio)
    (task_grad,) = torch.autograd.grad(task, features, retain_graph=True)
    (mi_grad,) = torch.autograd.grad(weight * mi, features)
    assert float(mi_grad.norm()) == pytest.approx(ratio * float(task_grad.norm()), rel=1e-6)
    # An MI term without gradient there gets no weight (nothing to scale).
    assert adaptive_weight(task, torch.zeros(()) * features.sum(), features, ratio) == 0.0


def test_the_head_reads_the_task_part_only() -> None:
    model = build_model("small_cnn", 3, 2, 16, head_share=0.25)
    assert (model.n_features, model.head_features) == (128, 32)
    assert model.head.in_features == 32
    x = torch.randn(4, 3, 16, 16)
    out = model.eval().outputs(x)
    assert out.backbone_features.shape == (4, 128)
    torch.testing.assert_close(out.features, out.backbone_features[:, :32])
    # The logits do not change when the non-task features do.
    changed = out.backbone_features.clone()
    changed[:, 32:] = torch.randn(4, 96)
    torch.testing.assert_close(model.head(changed[:, :32]), out.logits)
    # Without the option the head reads everything, as before.
    plain = build_model("small_cnn", 3, 2, 16).eval()
    assert plain.head_features == 128 and plain.head.in_features == 128
    with pytest.raises(UnshortcutError, match="head_share"):
        build_model("small_cnn", 3, 2, 16, head_share=1.0)


def test_part_sizes() -> None:
    assert part_sizes(128, 64, 2) == [64, 32, 32]
    assert part_sizes(10, 5, 3) == [5, 2, 2, 1]
    with pytest.raises(UnshortcutError, match="leave 1 for 2 attribute part"):
        part_sizes(10, 9, 2)


class _TinyClassifier(Classifier):
    """A Classifier over the fake context's feature vectors (a linear-ReLU backbone)."""

    def __init__(self, head_share: float) -> None:
        width = 12
        super().__init__(
            nn.Sequential(nn.Linear(N_FEATURES, width), nn.ReLU()),
            width,
            2,
            round(head_share * width),
        )


def _mixed_split(n: int, seed: int) -> GroupedSplit:
    """A continuous attribute (a ratio, binned at 0.5) and a categorical one (3 sites)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    ratio = np.clip(0.3 + 0.4 * labels + 0.2 * rng.standard_normal(n), 0, 1)
    site = rng.integers(0, 3, n)
    return GroupedSplit(
        labels=labels,
        bins=np.stack([(ratio >= 0.5).astype(np.int64), site], axis=1),
        bin_counts=(2, 3),
        image_ids=np.arange(n) % 5,
        values=np.stack([ratio, site.astype(np.float64)], axis=1),
        attribute_names=("tissue_ratio", "site"),
        continuous=(True, False),
    )


class _MixedContext(FakeContext):
    def new_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return _TinyClassifier(0.5)


def _mimm(**hp: Any) -> tuple[Any, nn.Module, dict[str, torch.optim.Optimizer], _MixedContext]:
    ctx = _MixedContext(_mixed_split(120, 0), _mixed_split(40, 1), batch_size=32)
    method = get_method("mimm")(ctx, **hp)
    model = ctx.new_model()
    return method, model, method.optimizers(model), ctx


def test_continuous_and_categorical_attributes_get_their_own_heads_and_targets() -> None:
    method, _, optimizers, ctx = _mimm()
    assert method.sizes == [6, 3, 3]
    heads = method.extra_modules()["heads"]
    assert [h.out_features for h in heads] == [1, 3]  # regression, 3 sites
    assert [h.in_features for h in heads] == [3, 3]
    assert len(method.extra_modules()["estimators"]) == 3  # every pair of the 3 parts
    assert method.pair_names == ["mi_task_tissue_ratio", "mi_task_site", "mi_tissue_ratio_site"]
    ratio = ctx.train.values[:, 0]
    np.testing.assert_allclose(method.targets[0], (ratio - ratio.mean()) / ratio.std(), atol=1e-6)
    assert method.targets[1].dtype == torch.long
    np.testing.assert_array_equal(method.targets[1], ctx.train.bins[:, 1])
    assert set(optimizers) == {"model", "estimator"}
    estimator_params = {id(p) for p in method.extra_modules()["estimators"].parameters()}
    model_params = {id(p) for g in optimizers["model"].param_groups for p in g["params"]}
    assert not estimator_params & model_params
    assert {id(p) for p in heads.parameters()} <= model_params
    only_task = get_method("mimm")(ctx, pairs="task")
    assert only_task.pair_names == ["mi_task_tissue_ratio", "mi_task_site"]


def test_a_train_step_logs_every_term_and_moves_each_part_its_own_way() -> None:
    method, model, optimizers, ctx = _mimm(attribute_weight=1.0)
    batch = ctx.batch(np.arange(32))
    before = {n: p.detach().clone() for n, p in method.extra_modules().named_parameters()}
    terms = method.train_step(model, batch, optimizers)
    assert set(terms) == {
        "loss", "loss_task", "loss_tissue_ratio", "loss_site", "mi_weight",
        "mi_task_tissue_ratio", "mi_task_site", "mi_tissue_ratio_site",
    }  # fmt: skip
    assert all(math.isfinite(v) for v in terms.values()) and terms["mi_weight"] > 0
    after = dict(method.extra_modules().named_parameters())
    # Heads and critics step (a critic's output bias need not: the DV bound ignores shifts).
    assert all(not torch.equal(before[n], after[n]) for n in before if n.endswith("weight"))
    estimators = method.extra_modules()["estimators"]
    assert all(int(e.updates) == 1 for e in estimators)
    # The attribute heads learn their attributes from their parts.
    first = terms
    for _ in range(150):
        terms = method.train_step(model, batch, optimizers)
    assert terms["loss_tissue_ratio"] < 0.85 * first["loss_tissue_ratio"]  # plateaus near 0.82x
    assert terms["loss_task"] < first["loss_task"]


def test_a_gaussian_step_needs_no_critic_and_descends_the_closed_form() -> None:
    method, model, optimizers, ctx = _mimm(estimator="gaussian", marginal="class")
    assert set(optimizers) == {"model"} and len(method.extra_modules()["estimators"]) == 0
    batch = ctx.batch(np.arange(32))
    parts = method.split(model.outputs(batch.x).backbone_features.detach())
    expected = gaussian_mutual_information(parts[0], parts[1], batch.y, 0.1)
    terms = method.train_step(model, batch, optimizers)
    assert terms["mi_task_tissue_ratio"] == pytest.approx(float(expected), rel=1e-5)
    assert terms["mi_weight"] > 0 and math.isfinite(terms["loss"])


def test_mimm_needs_an_attribute_and_checks_its_settings() -> None:
    no_attribute = GroupedSplit(
        labels=np.array([0, 1]),
        bins=np.zeros((2, 0), np.int64),
        bin_counts=(),
        image_ids=np.array([0, 1]),
    )
    with pytest.raises(UnshortcutError, match="needs at least one attribute"):
        get_method("mimm").check_hparams(get_defaults(), no_attribute)
    split = _mixed_split(20, 0)
    with pytest.raises(UnshortcutError, match="pairs='some'"):
        get_method("mimm").check_hparams(get_defaults() | {"pairs": "some"}, split)
    with pytest.raises(UnshortcutError, match="marginal='rows'"):
        get_method("mimm").check_hparams(get_defaults() | {"marginal": "rows"}, split)
    with pytest.raises(UnshortcutError, match="estimator='knn'"):
        get_method("mimm").check_hparams(get_defaults() | {"estimator": "knn"}, split)
    with pytest.raises(UnshortcutError, match="shrinkage must lie in"):
        get_method("mimm").check_hparams(get_defaults() | {"shrinkage": 1.0}, split)
    with pytest.raises(UnshortcutError, match="estimator_steps must be >= 1"):
        get_method("mimm").check_hparams(get_defaults() | {"estimator_steps": 0}, split)
    assert get_method("mimm").model_options({}) == {"head_share": 0.5}
    assert get_method("mimm").model_options({"task_share": 0.75}) == {"head_share": 0.75}


def get_defaults() -> dict[str, Any]:
    return {name: h.default for name, h in get_method("mimm").hparams.items()}


# ----------------------------------------------------------------------------- loop


@pytest.fixture(scope="module")
def site_patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_site_patch_set(tmp_path_factory.mktemp("sites") / "patches")


def _config(patches: Path, out: Path, **changes: Any) -> TrainConfig:
    fast = {"epochs": 3, "batch_size": 32, "bootstrap": 0, "device": "cpu", "num_threads": 1}
    return TrainConfig(patches=patches, out=out, **(fast | changes))


def test_a_killed_mimm_run_resumes_exactly(site_patches: Path, tmp_path: Path) -> None:
    config = _config(
        site_patches, tmp_path / "whole", method="mimm", attributes=["tissue_ratio", "site"]
    )
    whole = train(config, progress=False)
    history = [json.loads(line) for line in (whole / "history.jsonl").read_text().splitlines()]
    assert {"loss_task", "loss_tissue_ratio", "loss_site", "mi_task_site"} <= set(
        history[0]["train"]
    )
    last = torch.load(whole / "checkpoints" / "last.pt", weights_only=False)
    assert set(last["optimizers"]) == {"model", "estimator"}
    assert int(last["extra"]["estimators.0.updates"]) == 3 * 5  # 144 rows / 32: 5 steps
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["method_report"]["parts"] == {"task": 64, "tissue_ratio": 32, "site": 32}
    assert set(metrics["decodability"]) == {"tissue_ratio", "site"}

    resumed = config.model_copy(update={"out": tmp_path / "resumed"})
    kill_after_epoch(resumed, 1)
    train(resumed, resume=True, progress=False)
    for name in ("metrics.json", "history.jsonl"):
        assert (resumed.out / name).read_text() == (whole / name).read_text()
    again = torch.load(resumed.out / "checkpoints" / "last.pt", weights_only=False)
    for key, value in last["extra"].items():  # critics, heads and moving averages
        torch.testing.assert_close(again["extra"][key], value, rtol=0, atol=0)

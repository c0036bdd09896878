"""MeDi generator parts: schedule arithmetic, conditioning, guidance, scaling, plans, donors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from unshortcut.errors import UnshortcutError
from unshortcut.generate.balance import BalancePolicy, plan_counts, sampling_scheme
from unshortcut.generate.conditioning import (
    ConditionEmbedding,
    ConditionEncoder,
    fit_conditions,
    null_conditions,
)
from unshortcut.generate.config import GeneratorConfig, load_generator_config
from unshortcut.generate.diffusion import (
    ddim_sample,
    ddim_timesteps,
    guided_prediction,
    sampling_scheduler,
    training_scheduler,
    training_target,
)
from unshortcut.generate.model import ConditionalUNet
from unshortcut.generate.quality import frechet_distance, nearest_distance
from unshortcut.generate.scaling import PixelScaling, masks_forward, masks_inverse
from unshortcut.generate.targets import assign_identities, draw_rows, group_slug

T = 1000


def _table(n: int = 40, seed: int = 0) -> pd.DataFrame:
    """Training rows: label, tissue ratio, site; no tumor patch at site 'b' with much tissue."""
    rng = np.random.default_rng(seed)
    label = np.arange(n) % 2
    tissue = rng.uniform(0.05, 1.0, n)
    site = np.where(rng.random(n) < 0.5, "a", "b")
    site[(label == 1) & (tissue >= 0.5)] = "a"
    return pd.DataFrame(
        {
            "patch_id": [f"p{i}" for i in range(n)],
            "image_id": [f"img{i % 4}" for i in range(n)],
            "patient_id": [f"pat{i % 4}" for i in range(n)],
            "split": "train",
            "x": np.zeros(n, np.int64),
            "y": np.zeros(n, np.int64),
            "size": np.full(n, 16),
            "level": np.zeros(n, np.int64),
            "tumor_fraction": np.where(label == 1, rng.uniform(0.1, 0.9, n), 0.0),
            "tissue_ratio": tissue,
            "label": label.astype(np.int64),
            "synthetic": np.zeros(n, bool),
            "site": site,
        }
    )


def _model(table: pd.DataFrame, channels: int = 2) -> tuple[ConditionalUNet, ConditionEncoder]:
    """A small U-Net with random (not zero-initialised) weights, so outputs are informative."""
    config = GeneratorConfig(
        patches="p", out="o", widths=[16, 16], attention=[False, False], head_channels=16
    )
    encoder = ConditionEncoder(fit_conditions(table, [], "table"))
    torch.manual_seed(0)
    model = ConditionalUNet(channels, encoder.conditions, config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval(), encoder


# --------------------------------------------------------------------------- schedule


def test_linear_schedule_alpha_bar_is_the_product_of_one_minus_beta() -> None:
    betas = np.linspace(1e-4, 2e-2, T)
    expected = np.cumprod(1 - betas)
    scheduler = training_scheduler(T, "linear_beta")
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), expected, rtol=1e-5)


def test_cosine_schedule_alpha_bar_follows_the_squared_cosine() -> None:
    s = 8e-3
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    expected = f[1:] / f[0]
    got = training_scheduler(T, "cosine").alphas_cumprod.numpy()
    # Betas are clipped at 0.999 only at the very end of the schedule.
    np.testing.assert_allclose(got[: T - 20], expected[: T - 20], rtol=1e-4)
    sampler = sampling_scheduler(T, "cosine", 10)
    np.testing.assert_array_equal(sampler.alphas_cumprod.numpy(), got)


def test_add_noise_is_the_closed_form() -> None:
    scheduler = training_scheduler(T, "linear_beta")
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 2e-2, T))
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (5, 2, 4, 4))
    eps = rng.normal(size=x0.shape)
    t = np.array([0, 10, 250, 700, 999])
    expected = (
        np.sqrt(alpha_bar[t])[:, None, None, None] * x0
        + np.sqrt(1 - alpha_bar[t])[:, None, None, None] * eps
    )
    got = scheduler.add_noise(torch.tensor(x0).float(), torch.tensor(eps).float(), torch.tensor(t))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_ddim_timesteps_are_evenly_spaced_from_the_noise_end() -> None:
    assert ddim_timesteps(1000, 4).tolist() == [999, 749, 499, 249]
    assert ddim_timesteps(1000, 30).tolist()[:3] == [999, 966, 933]
    assert ddim_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_ddim_step_with_the_true_target_lands_on_the_forward_process(prediction: str) -> None:
    """x_{t-k} = sqrt(ab') x0_hat + sqrt(1 - ab') eps, x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab).

    Given the true noise (or velocity v = sqrt(ab) eps - sqrt(1 - ab) x0), that is
    exactly the forward process at t - k.
    """
    sampler = sampling_scheduler(T, "linear_beta", 20, prediction)
    noising = training_scheduler(T, "linear_beta", prediction)
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 2e-2, T))
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-0.9, 0.9, (3, 2, 4, 4))
    eps = rng.normal(size=x0.shape)
    t, k = 549, T // 20
    x_t = np.sqrt(alpha_bar[t]) * x0 + np.sqrt(1 - alpha_bar[t]) * eps
    velocity = np.sqrt(alpha_bar[t]) * eps - np.sqrt(1 - alpha_bar[t]) * x0
    x0_hat = (x_t - np.sqrt(1 - alpha_bar[t]) * eps) / np.sqrt(alpha_bar[t])
    expected = np.sqrt(alpha_bar[t - k]) * x0_hat + np.sqrt(1 - alpha_bar[t - k]) * eps
    as_tensor = lambda a: torch.tensor(a).float()  # noqa: E731
    target = training_target(noising, as_tensor(x0), as_tensor(eps), torch.full((3,), t))
    np.testing.assert_allclose(
        target.numpy(), eps if prediction == "epsilon" else velocity, atol=1e-5
    )
    previous, estimate = sampler.step(target, t, as_tensor(x_t))
    np.testing.assert_allclose(previous.numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(estimate.numpy(), x0, atol=1e-4)


def test_ddim_sampling_with_an_oracle_denoiser_recovers_the_image() -> None:
    """A model that knows x0 predicts eps exactly; 10 DDIM steps must return x0."""
    alpha_bar = training_scheduler(T, "cosine").alphas_cumprod
    x0 = torch.rand(2, 1, 4, 4) * 1.6 - 0.8

    def oracle(x: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sampler = sampling_scheduler(T, "cosine", 10)
    out = ddim_sample(oracle, torch.zeros(2, 1), noise, sampler, guidance_scale=3.0)  # type: ignore[arg-type]
    np.testing.assert_allclose(out.numpy(), x0.numpy(), atol=1e-4)


# --------------------------------------------------------------------------- conditioning


def test_automatic_conditions_are_label_tissue_ratio_and_categorical_metadata() -> None:
    conditions = fit_conditions(_table(), [], "t")
    assert [c.column for c in conditions] == ["label", "tissue_ratio", "site"]
    assert conditions[0].categories == ("0", "1")
    assert not conditions[1].categorical and 0.05 <= conditions[1].low < conditions[1].high <= 1
    assert conditions[2].categories == ("a", "b")
    explicit = fit_conditions(_table(), ["site:cat", "tumor_fraction:num"], "t")
    assert [c.column for c in explicit] == ["label", "site", "tumor_fraction"]
    for bad, message in (
        (["label"], "always a condition"),
        (["nope"], "no column 'nope'"),
        (["site:num"], "not numeric"),
        (["site:x"], "reads like"),
    ):
        with pytest.raises(UnshortcutError, match=message):
            fit_conditions(_table(), bad, "t")


def test_encoding_scales_continuous_values_and_refuses_unseen_categories() -> None:
    table = _table()
    encoder = ConditionEncoder(fit_conditions(table, [], "t"))
    encoded = encoder.encode(table)
    low, high = table["tissue_ratio"].min(), table["tissue_ratio"].max()
    np.testing.assert_allclose(encoded[:, 1], (table["tissue_ratio"] - low) / (high - low), 1e-6)
    assert encoded[:, 0].tolist() == table["label"].tolist()
    assert encoded[:, 2].tolist() == (table["site"] == "b").astype(float).tolist()
    other = table.assign(site="c")
    with pytest.raises(UnshortcutError, match="value\\(s\\) c"):
        encoder.encode(other, "other")


def test_condition_embeddings_add_up_one_per_condition() -> None:
    """MeDi's sum: changing one condition shifts the embedding by the same vector
    whatever the others are."""
    encoder = ConditionEncoder(fit_conditions(_table(), [], "t"))
    torch.manual_seed(0)
    embed = ConditionEmbedding(encoder.conditions, dim=8)
    c = torch.tensor([[0, 0.2, 0], [0, 0.2, 1], [1, 0.7, 0], [1, 0.7, 1]], dtype=torch.float32)
    e = embed(c).detach()
    torch.testing.assert_close(e[1] - e[0], e[3] - e[2])
    none = embed(null_conditions(1, 3)).detach()
    assert not torch.allclose(none, e[:1])


def test_each_condition_changes_the_denoiser_output() -> None:
    model, _ = _model(_table())
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    base = torch.tensor([[0.0, 0.3, 0.0]])
    out = model(x, t, base)
    torch.testing.assert_close(model(x, t, base), out)
    for k, value in ((0, 1.0), (1, 0.8), (2, 1.0), (1, float("nan"))):
        changed = base.clone()
        changed[0, k] = value
        assert (model(x, t, changed) - out).abs().max() > 1e-3, (k, value)


def test_guidance_scale_zero_is_exactly_the_unconditional_prediction() -> None:
    model, _ = _model(_table())
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 400, 900])
    conditions = torch.tensor([[0, 0.1, 0], [1, 0.9, 1], [1, 0.5, 0]], dtype=torch.float32)
    unconditional = model(x, t, null_conditions(3, 3))
    conditional = model(x, t, conditions)
    assert torch.equal(guided_prediction(model, x, t, conditions, 0.0), unconditional)
    torch.testing.assert_close(guided_prediction(model, x, t, conditions, 1.0), conditional)
    torch.testing.assert_close(
        guided_prediction(model, x, t, conditions, 3.0),
        unconditional + 3 * (conditional - unconditional),
    )


# --------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_pixel_scaling_inverts_integers_exactly_inside_the_range(dtype: type) -> None:
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    pixels = rng.integers(0, top, (30, 2, 4, 4), endpoint=True).astype(dtype)
    scaling = PixelScaling.fit(pixels, np.arange(30), (0.0, 100.0), seed=0)
    scaled = scaling.forward(pixels)
    assert scaled.dtype == np.float32 and scaled.min() == -1 and scaled.max() == 1
    back = scaling.inverse(scaled)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, pixels)


def test_pixel_scaling_clips_outside_the_percentiles_and_keeps_float_dtypes() -> None:
    pixels = np.linspace(-5, 5, 2 * 1 * 10 * 10, dtype=np.float32).reshape(2, 1, 10, 10)
    scaling = PixelScaling.fit(pixels, np.arange(2), (10.0, 90.0), seed=0)
    assert scaling.low[0] == pytest.approx(-4.0, abs=0.01)
    assert scaling.high[0] == pytest.approx(4.0, abs=0.01)
    back = scaling.inverse(scaling.forward(pixels))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, np.clip(pixels, scaling.low[0], scaling.high[0]), atol=1e-5)
    masks = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    np.testing.assert_array_equal(masks_inverse(masks_forward(masks)), masks)


# --------------------------------------------------------------------------- plans


def test_balance_policies_give_the_hand_computed_counts() -> None:
    counts, largest = np.array([10, 50, 3, 0]), 50
    assert BalancePolicy.parse("largest").needed(counts, largest).tolist() == [40, 0, 47, 50]
    assert BalancePolicy.parse("ratio:0.5").needed(counts, largest).tolist() == [15, 0, 22, 25]
    assert BalancePolicy.parse("count:20").needed(counts, largest).tolist() == [10, 0, 17, 20]
    for bad in ("ratio:0", "ratio:1.5", "count:0", "count:2.5", "most", "largest:2"):
        with pytest.raises(UnshortcutError, match="--balance"):
            BalancePolicy.parse(bad)


def test_plans_keep_empty_groups_and_measure_against_the_largest() -> None:
    table = _table(n=40)
    scheme = sampling_scheme(table, ["tissue_ratio", "site:cat"], [], "t")
    counts = np.bincount(scheme.group_index(table), minlength=scheme.n_groups)
    empty = "tumor|tissue_ratio>=0.5&site=b"
    assert counts[scheme.group_names.index(empty)] == 0
    plan = plan_counts(scheme, table, "t", policy=BalancePolicy("largest"))
    assert plan[empty] == counts.max()
    assert sum(plan.values()) == counts.max() * scheme.n_groups - len(table)
    one = plan_counts(scheme, table, "t", groups=[empty], count=7)
    assert one == {empty: 7}
    with pytest.raises(UnshortcutError, match="unknown group"):
        plan_counts(scheme, table, "t", groups=["tumor"], count=1)
    with pytest.raises(UnshortcutError, match="exactly one"):
        plan_counts(scheme, table, "t", count=1, policy=BalancePolicy("largest"))


def test_donors_come_from_the_group_and_absent_groups_borrow_across_sites() -> None:
    table = _table(n=200)
    scheme = sampling_scheme(table, ["tissue_ratio", "site:cat"], [], "t")
    rng = np.random.default_rng(0)
    names = list(scheme.group_names)
    present = draw_rows(table, scheme, names.index("tumor|tissue_ratio<0.5&site=b"), 50, rng, "t")
    assert present.donor_rule == "group"
    assert (present.rows["tissue_ratio"] < 0.5).all() and (present.rows["site"] == "b").all()
    assert set(present.rows["tissue_ratio"]) <= set(table["tissue_ratio"])
    absent = draw_rows(table, scheme, names.index("tumor|tissue_ratio>=0.5&site=b"), 50, rng, "t")
    assert absent.donor_rule == "label and numeric bins"
    rows = absent.rows
    assert (rows["label"] == 1).all() and (rows["site"] == "b").all()
    assert (rows["tissue_ratio"] >= 0.5).all() and (rows["tumor_fraction"] > 0).all()
    assert rows.dtypes.to_dict() == table.dtypes.to_dict()


def test_identities_are_unique_readable_and_continue_numbering() -> None:
    table = _table(n=40)
    scheme = sampling_scheme(table, ["tissue_ratio", "site:cat"], [], "t")
    slugs = {group_slug(name) for name in scheme.group_names}
    assert len(slugs) == scheme.n_groups
    slug = group_slug("non-tumor|tissue_ratio>=0.5&site=a")
    assert slug == "non-tumor_tissue_ratio-ge-0.5+site-eq-a"
    rng = np.random.default_rng(0)
    draw = draw_rows(table, scheme, 0, 5, rng, "t")
    existing = ["img0", f"synthetic-{group_slug(draw.group)}-0000"]
    rows = assign_identities([draw], existing, patches_per_image=2)
    prefix = f"synthetic-{group_slug(draw.group)}"
    assert rows["image_id"].tolist() == [f"{prefix}-{k:04d}" for k in (1, 1, 2, 2, 3)]
    assert rows["patch_id"].tolist()[:3] == [f"{prefix}-0001@0", f"{prefix}-0001@1",
                                             f"{prefix}-0002@0"]  # fmt: skip
    assert set(rows["patient_id"]) == {prefix}
    assert (rows["split"] == "train").all() and rows["synthetic"].all()
    assert (rows[["x", "y", "size", "level"]] == -1).all().all()


# --------------------------------------------------------------------------- quality


def test_frechet_distance_matches_the_gaussian_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    a -= a.mean(0)
    shift = np.array([1.0, 2.0, -1.0])
    cov = np.cov(a, rowvar=False)
    assert frechet_distance(a, a + shift) == pytest.approx(6.0, abs=1e-3)
    # Doubling every feature: tr(S + 4S - 2 * 2S) = tr(S).
    assert frechet_distance(a, 2 * a) == pytest.approx(np.trace(cov), rel=1e-3)
    assert frechet_distance(a[:1], a) is None


def test_nearest_distance_is_the_root_mean_square_to_the_closest_reference() -> None:
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(7, 2, 3, 3)).astype(np.float32)
    reference = rng.normal(size=(11, 2, 3, 3)).astype(np.float32)
    brute = np.sqrt(((queries[:, None] - reference[None]) ** 2).mean(axis=(2, 3, 4))).min(1)
    np.testing.assert_allclose(nearest_distance(queries, reference, chunk=3), brute, rtol=1e-5)


# --------------------------------------------------------------------------- config


def test_presets_fill_in_and_flags_win() -> None:
    gpu = load_generator_config(None, patches="p", out="o", preset="gpu", epochs=3)
    assert gpu.widths == [64, 128, 256, 256] and gpu.epochs == 3
    cpu = load_generator_config(None, patches="p", out="o")
    assert cpu.widths == [32, 64, 64] and cpu.preset == "cpu"
    with pytest.raises(UnshortcutError, match="norm_groups"):
        load_generator_config(None, patches="p", out="o", widths=[20, 20, 20])
    with pytest.raises(UnshortcutError, match="erases the conditioning"):
        load_generator_config(None, patches="p", out="o", widths=[16, 16, 16], norm_groups=16)
    with pytest.raises(UnshortcutError, match="attention"):
        load_generator_config(None, patches="p", out="o", widths=[32, 64])
    with pytest.raises(UnshortcutError, match="head_channels"):
        load_generator_config(None, patches="p", out="o", widths=[16, 16], attention=[0, 0])

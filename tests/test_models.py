"""Model registry: every backbone gives (B, n_classes) logits and (B, D) features."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from unshortcut.errors import UnshortcutError
from unshortcut.models import Classifier, build_model, model_names


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_output_and_feature_shapes(name: str, channels: int) -> None:
    model = build_model(name, channels, 2, 16)
    assert isinstance(model, Classifier)
    x = torch.randn(2, channels, 16, 16)
    model.eval()
    with torch.no_grad():
        features = model.features(x)
        logits = model(x)
    assert features.shape == (2, model.n_features)
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits, model.head(features))
    assert isinstance(model.head, torch.nn.Linear)


def test_small_cnn_is_input_size_agnostic_and_registered() -> None:
    assert {"small_cnn", "resnet18", "resnet34", "resnet50"} <= set(model_names())
    model = build_model("small_cnn", 3, 3, 64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_and_impossible_models_are_user_errors() -> None:
    with pytest.raises(UnshortcutError, match="unknown model 'vgg'"):
        build_model("vgg", 3, 2, 32)
    with pytest.raises(UnshortcutError, match="no pretrained weights"):
        build_model("small_cnn", 3, 2, 32, pretrained=True)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_missing_is_a_clear_error() -> None:
    with pytest.raises(UnshortcutError, match="timm is not installed"):
        build_model("timm:resnet18", 3, 2, 32)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm (optional) missing")
@pytest.mark.parametrize("channels", [1, 5])
def test_timm_backbone_any_channels(channels: int) -> None:
    model = build_model("timm:resnet18", channels, 2, 32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, 32, 32)).shape == (2, 2)
    with pytest.raises(UnshortcutError, match="no model named"):
        build_model("timm:not_a_model_xyz", channels, 2, 32)

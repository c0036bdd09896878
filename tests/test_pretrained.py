"""Pretrained weights: torchvision-style checkpoints written here, loaded onto MONAI ResNets."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unshortcut.errors import UnshortcutError
from unshortcut.models import build_model, pretrained
from unshortcut.models.pretrained import adapt_first_conv, unwrap_state_dict

# torchvision's ResNet layout, written from its definition (not from MONAI's keys):
# block type and blocks per stage; stage widths 64-128-256-512; bottlenecks expand by 4.
LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchvision_resnet_state(
    depth: int, seed: int = 0, with_counters: bool = True
) -> dict[str, torch.Tensor]:
    """Random weights under torchvision's key names and shapes (with its 1000-class fc)."""
    block, counts = LAYOUTS[depth]
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        std = (2 / (inp * k * k)) ** 0.5  # He initialisation: activations stay O(1)
        state[f"{name}.weight"] = std * torch.randn(out, inp, k, k, generator=generator)

    def bn(name: str, n: int) -> None:
        state[f"{name}.weight"] = torch.rand(n, generator=generator) + 0.5
        state[f"{name}.bias"] = torch.randn(n, generator=generator)
        state[f"{name}.running_mean"] = 0.1 * torch.randn(n, generator=generator)
        state[f"{name}.running_var"] = torch.rand(n, generator=generator) + 0.5
        if with_counters:
            state[f"{name}.num_batches_tracked"] = torch.tensor(1234)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), counts, strict=True), 1):
        for index in range(blocks):
            prefix = f"layer{stage}.{index}"
            if block == "basic":
                conv(f"{prefix}.conv1", planes, inplanes, 3)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes)
                out = planes
            else:
                conv(f"{prefix}.conv1", planes, inplanes, 1)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes)
                conv(f"{prefix}.conv3", 4 * planes, planes, 1)
                bn(f"{prefix}.bn3", 4 * planes)
                out = 4 * planes
            if (index == 0 and stage > 1) or inplanes != out:
                conv(f"{prefix}.downsample.0", out, inplanes, 1)
                bn(f"{prefix}.downsample.1", out)
            inplanes = out
    state["fc.weight"] = torch.randn(1000, inplanes, generator=generator)
    state["fc.bias"] = torch.randn(1000, generator=generator)
    return state


def write_checkpoint(state: dict[str, torch.Tensor], path: Path) -> Path:
    """.pth wrapped as a DDP training script saves it; .safetensors under an SSL prefix."""
    if path.suffix == ".safetensors":
        save_file({f"backbone.{k}": v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_torchvision_checkpoint_loads_onto_monai_resnet18(
    tmp_path: Path, suffix: str, channels: int
) -> None:
    source = torchvision_resnet_state(18)
    path = write_checkpoint(source, tmp_path / f"resnet18{suffix}")
    model = build_model("resnet18", channels, 2, 64, pretrained=str(path))
    loaded = model.backbone.state_dict()

    rgb = source["conv1.weight"]
    expected_conv1 = rgb if channels == 3 else (rgb.sum(1, keepdim=True) / channels)
    torch.testing.assert_close(
        loaded["conv1.weight"], expected_conv1.expand(-1, channels, -1, -1), rtol=0, atol=1e-6
    )
    copied = [k for k in source if not k.startswith(("fc.", "conv1."))]
    assert len(copied) == 119
    for key in copied:
        assert torch.equal(loaded[key], source[key]), key
    # MONAI's downsampling convolution has a bias torchvision's lacks: zero, the same function.
    downsample_biases = [k for k in loaded if k.endswith("downsample.0.bias")]
    assert len(downsample_biases) == 3
    assert all(not loaded[k].any() for k in downsample_biases)
    assert not any(k.startswith("fc") for k in loaded)


def test_adapted_first_conv_sees_equal_channels_as_the_rgb_net_sees_grey(tmp_path: Path) -> None:
    """The documented reason for the 3 / C scale: a grey input gives the same features."""
    path = write_checkpoint(torchvision_resnet_state(18, seed=1), tmp_path / "w.pth")
    grey = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    features = {}
    for channels in (1, 3, 5):
        model = build_model("resnet18", channels, 2, 64, pretrained=str(path)).eval()
        with torch.no_grad():
            features[channels] = model.features(grey.expand(-1, channels, -1, -1))
    torch.testing.assert_close(features[1], features[3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features[5], features[3], rtol=1e-4, atol=1e-4)


def test_checkpoint_without_batchnorm_counters_loads(tmp_path: Path) -> None:
    """torchvision's published files predate num_batches_tracked; the counters keep 0."""
    source = torchvision_resnet_state(18, with_counters=False)
    path = tmp_path / "old.pth"
    torch.save(source, path)
    loaded = build_model("resnet18", 3, 2, 32, pretrained=str(path)).backbone.state_dict()
    assert torch.equal(loaded["layer4.1.bn2.running_var"], source["layer4.1.bn2.running_var"])
    assert int(loaded["bn1.num_batches_tracked"]) == 0


def test_resnet50_checkpoint_onto_resnet18_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_checkpoint(torchvision_resnet_state(50), tmp_path / "resnet50.pth")
    with pytest.raises(UnshortcutError) as caught:
        build_model("resnet18", 3, 2, 64, pretrained=str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--pretrained {path}: does not fit resnet18: keys ")
    assert (
        "keys 23 of another shape (layer1.0.conv1.weight (64, 64, 1, 1) vs (64, 64, 3, 3)"
        in message
    )
    assert message.endswith(
        "; 198 unexpected (layer1.0.conv3.weight, layer1.0.bn3.weight, layer1.0.bn3.bias, ...)"
    )


def test_partial_checkpoint_names_the_missing_keys(tmp_path: Path) -> None:
    source = torchvision_resnet_state(18)
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in source.items() if not k.startswith("layer4.")}, path)
    with pytest.raises(
        UnshortcutError,
        match=r"partial\.pth: does not fit resnet18: keys 26 missing \(layer4\.0\.conv1\.weight, "
        r"layer4\.0\.bn1\.weight, layer4\.0\.bn1\.bias, \.\.\.\)$",
    ):
        build_model("resnet18", 3, 2, 64, pretrained=str(path))


def test_unreadable_and_absent_files_are_user_errors(tmp_path: Path) -> None:
    pickled = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole pickled module, not a state dict
    with pytest.raises(UnshortcutError, match=r"model\.pth: not a readable weights file"):
        build_model("resnet18", 3, 2, 64, pretrained=str(pickled))
    with pytest.raises(UnshortcutError, match=r"nothere\.safetensors: no such checkpoint file"):
        build_model("resnet18", 3, 2, 64, pretrained=str(tmp_path / "nothere.safetensors"))
    empty = tmp_path / "empty.pt"
    torch.save({"model": {}}, empty)
    with pytest.raises(UnshortcutError, match=r"empty\.pt: holds no state dict"):
        build_model("resnet18", 3, 2, 64, pretrained=str(empty))


def test_unwrap_opens_containers_and_keeps_only_the_backbone() -> None:
    weight, head = torch.ones(1), torch.zeros(1)
    raw = {"model": {"module.encoder.conv1.weight": weight, "module.projector.0.weight": head}}
    assert unwrap_state_dict(raw, "x") == {"conv1.weight": weight}
    plain = {"conv1.weight": weight, "fc.weight": head, "meta": "not a tensor"}
    assert unwrap_state_dict(plain, "x") == {"conv1.weight": weight, "fc.weight": head}


def test_adapt_first_conv_numbers() -> None:
    weight = torch.tensor([1.0, 2.0, 6.0]).view(1, 3, 1, 1)
    assert adapt_first_conv(weight, 3) is weight
    assert adapt_first_conv(weight, 1).flatten().tolist() == [9.0]
    assert adapt_first_conv(weight, 2).flatten().tolist() == [4.5, 4.5]
    assert adapt_first_conv(weight, 6).flatten().tolist() == [1.5] * 6


def test_small_cnn_has_no_pretrained_weights(tmp_path: Path) -> None:
    with pytest.raises(UnshortcutError, match="no pretrained weights"):
        build_model("small_cnn", 3, 2, 32, pretrained=str(tmp_path / "w.pth"))


@pytest.mark.skipif(
    importlib.util.find_spec("huggingface_hub") is None,
    reason="huggingface_hub (optional extra 'hub') is not installed",
)
@pytest.mark.parametrize("spec", [True, "hf-hub:someone/pathology-resnet18"])
def test_offline_hub_name_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, spec: bool | str
) -> None:
    """Forced offline (and an empty cache), so the test never downloads anything."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    name = "hf-hub:timm/resnet18.tv_in1k" if spec is True else spec
    with pytest.raises(UnshortcutError) as caught:
        build_model("resnet18", 3, 2, 64, pretrained=spec)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--pretrained {name}: could not fetch the weights from the hub (")
    assert message.endswith("offline, download the checkpoint elsewhere and pass its file path")


def test_hub_name_without_hub_libraries_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained, "_optional", lambda module: None)
    with pytest.raises(
        UnshortcutError,
        match=r"^--pretrained resnet50\.a1_in1k: not a checkpoint file, and hub weights need "
        r"timm or huggingface_hub \(pip install 'unshortcut\[timm\]'\)",
    ):
        build_model("resnet50", 3, 2, 64, pretrained="resnet50.a1_in1k")


@pytest.mark.skipif(
    importlib.util.find_spec("timm") is None,
    reason="timm is optional and not installable in this environment (no CPU torchvision "
    "build for torch 2.13); the timm path is exercised where the extra is installed",
)
@pytest.mark.parametrize("channels", [1, 5])
def test_torchvision_checkpoint_loads_onto_timm_resnet18(tmp_path: Path, channels: int) -> None:
    source = torchvision_resnet_state(18)
    path = write_checkpoint(source, tmp_path / "resnet18.safetensors")
    loaded = build_model("timm:resnet18", channels, 2, 64, pretrained=str(path)).backbone
    state = loaded.state_dict()
    expected = source["conv1.weight"].sum(1, keepdim=True) / channels
    torch.testing.assert_close(state["conv1.weight"], expected.expand(-1, channels, -1, -1))
    assert torch.equal(
        state["layer3.0.downsample.0.weight"], source["layer3.0.downsample.0.weight"]
    )

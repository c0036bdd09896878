"""Pretrained weights for the project's backbones: local checkpoints and hub names.

``pretrained`` (the ``--pretrained`` value) is one of

* ``False`` / ``""``: no weights, a fresh initialisation;
* ``True``: the architecture's default ImageNet weights from the hub
  (:data:`DEFAULT_HUB_WEIGHTS` for the MONAI ResNets, timm's default tag for ``timm:``);
* a file: ``.pth`` / ``.pt`` / ``.bin`` (read with ``torch.load(weights_only=True)``, so
  a checkpoint cannot run code) or ``.safetensors``;
* a hub name: ``hf-hub:<org>/<repo>`` or any timm model name with a weights tag
  (``resnet50.a1_in1k``), fetched through timm or huggingface_hub when installed and
  the hub is reachable; otherwise a one-line error that says how to pass a file.

Checkpoints in the wild wrap their weights: :func:`unwrap_state_dict` opens the common
containers (``{"state_dict": ...}``, ``{"model": ...}``) and strips the prefixes of
DDP (``module.``) and self-supervised trainers (``backbone.`` / ``encoder.``; their
projection heads are dropped with them).

MONAI's ResNet names its modules exactly as torchvision (and timm) do -- ``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0/1``, ``fc`` -- so a torchvision- or
timm-style state dict maps onto it key for key. :func:`load_into` still checks every
key and shape against the target network and fills only what is provably equivalent:
a convolution bias the checkpoint lacks is zero (MONAI's downsampling convolution has
one, torchvision's has none: the same function), and BatchNorm's
``num_batches_tracked`` counter (absent from torchvision's files) keeps its value.
Anything else missing, unexpected or of another shape is an error that names the
file and the first mismatches, never a half-loaded network.

The first convolution is adapted to the patch set's channel count
(:func:`adapt_first_conv`): with the checkpoint's ``S`` input channels (3 for RGB) and
``C`` target channels, ``C == S`` copies the kernels, otherwise every target channel
gets the mean of the source kernels scaled by ``S / C``. The mean is the network's
response to luminance (non-RGB channels have no red, green or blue to match), and the
scale keeps the first layer's response to a uniform input of equal intensity in all
channels what it was for the RGB network. For ``C = 1`` this is the sum of the RGB
kernels (timm's rule for grey input).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from unshortcut.errors import UnshortcutError

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
#: Keys under which training scripts commonly store the weights.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
#: Prefixes of DDP and of self-supervised trainers' backbones.
WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.")
#: What ``pretrained=True`` loads onto the MONAI ResNets: torchvision's original
#: ImageNet weights as republished (with torchvision key names) by timm on the hub.
DEFAULT_HUB_WEIGHTS = {
    name: f"hf-hub:timm/{name}.tv_in1k" for name in ("resnet18", "resnet34", "resnet50")
}
#: Weight files tried, in order, in a hub repository fetched without timm.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Mismatched keys named in an error message, per kind.
SHOWN = 3

StateDict = dict[str, torch.Tensor]


def is_checkpoint_file(spec: str | Path) -> bool:
    """A file path (existing, or named like a checkpoint) rather than a hub name."""
    path = Path(spec)
    return path.suffix.lower() in CHECKPOINT_SUFFIXES or path.is_file()


def read_checkpoint(path: Path) -> StateDict:
    """The unwrapped state dict stored in a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise UnshortcutError(f"--pretrained {path}: no such checkpoint file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # each format raises its own types for a corrupt file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UnshortcutError(
            f"--pretrained {path}: not a readable weights file ({type(error).__name__}: "
            f"{first_line}); save a state dict, not a pickled model"
        ) from None
    return unwrap_state_dict(raw, str(path))


def unwrap_state_dict(raw: Any, source: str) -> StateDict:
    """Open containers and strip wrapper prefixes until plain module keys remain."""
    while isinstance(raw, Mapping):
        inner = next((raw[k] for k in CONTAINER_KEYS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, Mapping) or not raw:
        raise UnshortcutError(f"--pretrained {source}: holds no state dict")
    state = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UnshortcutError(f"--pretrained {source}: holds no tensors")
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            inside = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if inside:
                state, stripped = inside, True
    return state


def adapt_first_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """First-layer kernels ``(O, S, k, k)`` for ``channels`` inputs (rule in the module doc)."""
    source_channels = weight.shape[1]
    if channels == source_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return (mean * (source_channels / channels)).repeat(1, channels, 1, 1)


def _optional(module: str) -> ModuleType | None:
    """An optional dependency, or None when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def hub_state_dict(name: str) -> StateDict:
    """Weights for a hub name, through timm when installed, else huggingface_hub."""
    timm = _optional("timm")
    if timm is not None:
        try:
            return timm.create_model(name, pretrained=True).state_dict()
        except (OSError, RuntimeError, ValueError) as error:
            raise _hub_error(name, error) from None
    hub = _optional("huggingface_hub")
    if hub is None or not name.startswith("hf-hub:"):
        needs = "timm" if hub is not None else "timm or huggingface_hub"
        raise UnshortcutError(
            f"--pretrained {name}: not a checkpoint file, and hub weights need {needs} "
            "(pip install 'unshortcut[timm]'); or pass the path of a downloaded checkpoint"
        )
    repo = name.removeprefix("hf-hub:")
    from huggingface_hub.errors import LocalEntryNotFoundError

    failure: Exception | None = None
    for filename in HUB_WEIGHT_FILES:
        try:
            return read_checkpoint(Path(hub.hf_hub_download(repo, filename)))
        except LocalEntryNotFoundError as error:  # unreachable and not cached: stop here
            raise _hub_error(name, error) from None
        except (OSError, ValueError) as error:  # e.g. the repository has the other file
            failure = failure or error
    assert failure is not None
    raise _hub_error(name, failure) from None


def _hub_error(name: str, error: Exception) -> UnshortcutError:
    text = str(error).strip()
    reason = text.splitlines()[0] if text else type(error).__name__
    return UnshortcutError(
        f"--pretrained {name}: could not fetch the weights from the hub ({reason}); "
        "offline, download the checkpoint elsewhere and pass its file path"
    )


def pretrained_state_dict(spec: str | Path) -> StateDict:
    """The state dict a ``--pretrained`` file path or hub name stands for."""
    if is_checkpoint_file(spec):
        return read_checkpoint(Path(spec))
    return hub_state_dict(str(spec))


def _names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def load_into(
    net: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    model: str,
    first_conv: str | Sequence[str] = "conv1",
    classifier: str | Sequence[str] | None = "fc",
) -> None:
    """Load ``state`` onto ``net`` completely, or raise naming the first mismatches.

    ``first_conv`` names the input convolution(s) adapted to ``net``'s channel count;
    ``classifier`` the module(s) whose weights are dropped (our own head replaces them).
    """
    dropped = _names(classifier)
    state = {
        k: v for k, v in state.items() if not any(k == c or k.startswith(c + ".") for c in dropped)
    }
    target = net.state_dict()
    for conv in _names(first_conv):
        key = f"{conv}.weight"
        if key in state and key in target and state[key].ndim == target[key].ndim == 4:
            state[key] = adapt_first_conv(state[key], target[key].shape[1])
    merged: StateDict = {}
    missing, wrong_shape = [], []
    for key, value in target.items():
        if key in state:
            if state[key].shape != value.shape:
                wrong_shape.append(
                    f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)} in the model"
                )
            merged[key] = state[key]
        elif key.endswith("num_batches_tracked"):
            merged[key] = value
        elif _is_absent_conv_bias(net, key, state):
            merged[key] = torch.zeros_like(value)
        else:
            missing.append(key)
    unexpected = [k for k in state if k not in target]
    if missing or unexpected or wrong_shape:
        parts = [
            f"{len(found)} {kind} ({_first(found)})"
            for kind, found in (
                ("of another shape", wrong_shape),
                ("missing", missing),
                ("unexpected", unexpected),
            )
            if found
        ]
        raise UnshortcutError(
            f"--pretrained {source}: does not fit {model}: keys " + "; ".join(parts)
        )
    net.load_state_dict(merged, strict=True)


def _first(keys: list[str]) -> str:
    """The first :data:`SHOWN` keys, comma-separated, with ``...`` when there are more."""
    return ", ".join(keys[:SHOWN] + ["..."] * (len(keys) > SHOWN))


def _is_absent_conv_bias(net: nn.Module, key: str, state: Mapping[str, torch.Tensor]) -> bool:
    """A convolution's bias that the checkpoint lacks while it has the weight (zero bias)."""
    module_name, _, leaf = key.rpartition(".")
    if leaf != "bias" or f"{module_name}.weight" not in state:
        return False
    return isinstance(net.get_submodule(module_name), nn.modules.conv._ConvNd)

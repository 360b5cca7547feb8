"""Hashing networks: an ImageNet backbone, a K-bit linear hash layer, and tanh."""
import logging
import math
import os
import re

import torch
from torch import nn
from torchvision import models

from runtime import CliError, UsageError

log = logging.getLogger("mmhh")

RESNETS = {"ResNet18": models.resnet18, "ResNet34": models.resnet34, "ResNet50": models.resnet50,
           "ResNet101": models.resnet101, "ResNet152": models.resnet152}
VGGS = {"VGG11": models.vgg11, "VGG13": models.vgg13, "VGG16": models.vgg16, "VGG19": models.vgg19,
        "VGG11BN": models.vgg11_bn, "VGG13BN": models.vgg13_bn, "VGG16BN": models.vgg16_bn,
        "VGG19BN": models.vgg19_bn}
BACKBONES = {"AlexNetFc": {"AlexNet": models.alexnet}, "ResNetFc": RESNETS, "VGGFc": VGGS}
DEFAULT_BACKBONE = {"AlexNetFc": "AlexNet", "ResNetFc": "ResNet50", "VGGFc": "VGG16"}

# HashNet's continuation: tanh(scale * y), scale = (1 + 0.005 t)^0.5, raised every 200 iterations.
CONTINUATION_STEP = 200
CONTINUATION_GAMMA = 0.005
CONTINUATION_POWER = 0.5


# --pretrained imagenet is what the release's pretrained=True loaded: the first ImageNet weights.
PRETRAINED_ALIASES = {"imagenet": "IMAGENET1K_V1", "imagenet_v2": "IMAGENET1K_V2"}
# A torchvision weights name (IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V2), not a file name.
WEIGHTS_NAME = re.compile(r"(\w+_Weights\.)?[A-Z0-9_]+|imagenet(_v2)?")


class PretrainedWeightsError(CliError, ValueError):
    """ImageNet weights could not be had; the message says how to pass a local file."""


def build_network(image_network, hash_bit, backbone=None, pretrained="imagenet", continuation=False):
    """AlexNetFc / ResNetFc / VGGFc with a ``hash_bit`` tanh hash layer."""
    if image_network not in BACKBONES:
        raise UsageError(f"--image_network {image_network!r}: choose one of {', '.join(BACKBONES)}")
    backbone = backbone or DEFAULT_BACKBONE[image_network]
    if backbone not in BACKBONES[image_network]:
        raise UsageError(f"--backbone {backbone!r} does not fit --image_network {image_network}; "
                         f"choose one of {', '.join(BACKBONES[image_network])}")
    torchvision_model = load_backbone(BACKBONES[image_network][backbone], backbone, pretrained)
    features, width = _feature_layers(image_network, torchvision_model)
    # Channels-last runs the convolutions faster on CPUs (oneDNN) and suits tensor cores.
    return HashNetwork(features, width, hash_bit, continuation).to(memory_format=torch.channels_last)


class HashNetwork(nn.Module):
    """Backbone features -> Linear(width, K) -> tanh(scale * y)."""

    def __init__(self, feature_layers, feature_width, hash_bit, continuation=False):
        super().__init__()
        self.feature_layers = feature_layers
        self.hash_layer = nn.Linear(feature_width, hash_bit)
        nn.init.normal_(self.hash_layer.weight, 0.0, 0.01)
        nn.init.zeros_(self.hash_layer.bias)
        self.continuation = continuation
        # A buffer, so the scale reached in training travels in the snapshot and is used at test time.
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, images):  # (B, 3, H, W) -> (B, K)
        images = images.contiguous(memory_format=torch.channels_last)
        features = torch.flatten(self.feature_layers(images), 1)
        return torch.tanh(self.scale * self.hash_layer(features))

    def set_iteration(self, iteration):
        """Raise the HashNet continuation scale as the release did at 0-based ``iteration``."""
        if self.continuation:
            self.scale.fill_(continuation_scale(iteration))

    def parameter_groups(self):
        """Backbone at the base learning rate, the new hash layer at 10x."""
        return [{"params": list(self.feature_layers.parameters()), "lr_mult": 1.0},
                {"params": list(self.hash_layer.parameters()), "lr_mult": 10.0}]


def continuation_scale(iteration):
    """The release counted forward passes from 1 and raised the scale at each multiple of 200."""
    reached = (iteration + 1) // CONTINUATION_STEP * CONTINUATION_STEP
    return math.pow(1.0 + CONTINUATION_GAMMA * reached, CONTINUATION_POWER)


def load_backbone(builder, backbone, pretrained):
    """A torchvision model with ImageNet weights, weights from a local file, or none.

    ``pretrained``: 'imagenet' (IMAGENET1K_V1, what the release's ``pretrained=True`` loaded),
    'imagenet_v2', any torchvision weights name of the backbone (``IMAGENET1K_V2``,
    ``ResNet50_Weights.IMAGENET1K_V2``), 'none', or the path of a state-dict file.
    """
    if pretrained == "none":
        return builder(weights=None)
    if os.path.exists(pretrained) or not WEIGHTS_NAME.fullmatch(pretrained):
        return _load_weights_file(builder, backbone, pretrained)
    weights = torchvision_weights(builder, backbone, pretrained)
    try:
        return builder(weights=weights)
    except Exception as error:  # download failures surface as URLError, OSError, RuntimeError...
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise PretrainedWeightsError(
            f"could not get torchvision's {weights} for {backbone} ({type(error).__name__}: {error}). "
            f"torchvision looks for {cached}: download {weights.url} there on a machine with internet, "
            f"or pass --pretrained /path/to/weights.pth, or train from scratch with --pretrained none.") from None


def torchvision_weights(builder, backbone, pretrained):
    """The torchvision weights that --pretrained names for this backbone."""
    available = models.get_model_weights(builder)
    name = PRETRAINED_ALIASES.get(pretrained, pretrained).split(".")[-1]
    if name not in available.__members__:
        raise PretrainedWeightsError(
            f"--pretrained {pretrained}: {backbone} has no torchvision weights {name} and no file of that "
            f"name exists; choose imagenet (IMAGENET1K_V1, as the release), "
            f"{', '.join(available.__members__)}, none, or a local weights file")
    return available[name]


def _load_weights_file(builder, backbone, path):
    model = builder(weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except FileNotFoundError:
        raise PretrainedWeightsError(f"--pretrained {path}: no such file") from None
    except Exception as error:
        raise PretrainedWeightsError(
            f"--pretrained {path}: not a {backbone} state dict that torch.load(weights_only=True) "
            f"can read ({type(error).__name__}: {error})") from None
    return model


def _feature_layers(image_network, model):
    """Everything of the torchvision model up to the layer the hash layer replaces, and its width."""
    if image_network == "ResNetFc":
        layers = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1,
                               model.layer2, model.layer3, model.layer4, model.avgpool)
        return layers, model.fc.in_features
    # AlexNet and VGG: conv features, pooling, then fc6/fc7 without the last classifier layer.
    layers = nn.Sequential(model.features, model.avgpool, nn.Flatten(1), *model.classifier[:6])
    return layers, model.classifier[6].in_features

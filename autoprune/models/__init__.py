"""Built-in model zoo (CIFAR-style ResNet, plain net, VGG, MobileNetV2) and its registry.

Every model works on 8x8 to 32x32 inputs with any number of input channels, and ends in an
``nn.Linear`` named ``fc`` (see :func:`classifier_name`).
"""

from autoprune.models.mobilenetv2 import MobileNetV2, mobilenetv2
from autoprune.models.registry import (
    MODELS,
    ModelError,
    ModelFactory,
    build_model,
    checkpoint_hash,
    classifier_name,
    load_checkpoint,
    resolve_factory,
    state_dict_mismatch,
)
from autoprune.models.resnet import BasicBlock, CifarResNet, plain20, resnet20, resnet32, resnet56
from autoprune.models.vgg import VGG, vgg11, vgg16

__all__ = [
    "MODELS",
    "VGG",
    "BasicBlock",
    "CifarResNet",
    "MobileNetV2",
    "ModelError",
    "ModelFactory",
    "build_model",
    "checkpoint_hash",
    "classifier_name",
    "load_checkpoint",
    "mobilenetv2",
    "plain20",
    "resnet20",
    "resnet32",
    "resnet56",
    "resolve_factory",
    "state_dict_mismatch",
    "vgg11",
    "vgg16",
]

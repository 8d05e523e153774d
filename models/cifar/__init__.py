"""The CIFAR architectures (32×32 input); importing this package registers every one of them in MODELS."""
from . import mobilenetv2, resnet, resnet50, shufflenetv1, shufflenetv2, vgg, wrn

__all__ = ["mobilenetv2", "resnet", "resnet50", "shufflenetv1", "shufflenetv2", "vgg", "wrn"]

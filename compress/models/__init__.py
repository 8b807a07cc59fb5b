"""Model registry and the built-in CIFAR models."""

from compress.models import nin, resnet, vgg  # noqa: F401  (registers the models)
from compress.models.registry import create_from_arch, create_model, list_models, register_model

__all__ = ["create_from_arch", "create_model", "list_models", "register_model"]

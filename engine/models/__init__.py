"""Model families (one file each) built from `engine.layers`, and the architecture registry."""

from engine.models.config import ModelArchConfig
from engine.models.registry import MODEL_REGISTRY, get_model_class

__all__ = ["MODEL_REGISTRY", "ModelArchConfig", "get_model_class"]

"""Model loading: Hugging Face folders (safetensors), GGUF files (dequantized), or dummy weights."""

from engine.loader.model_loader import LoadedModel, load_model, resolve_model_path
from engine.loader.tokenizer_info import TokenizerInfo

__all__ = ["LoadedModel", "TokenizerInfo", "load_model", "resolve_model_path"]

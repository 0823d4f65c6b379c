"""The model: GGUF reading, the Llama NNX module, the tokenizer and the chat template.

Example::

    from jaxsample.model import load_model
    model, tok = load_model()                     # the default SmolLM2-135M-Instruct file
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
"""

from jaxsample.model.config import LlamaConfig, tiny_config
from jaxsample.model.gguf_file import (
    GGUFFile,
    ModelFileError,
    ModelNotFoundError,
    check_gguf_file,
    default_model_path,
    read_gguf,
    verify_default_model,
)
from jaxsample.model.llama import KVCache, Llama, weights_from_gguf
from jaxsample.model.loading import load_model
from jaxsample.model.tokenizer import Tokenizer

__all__ = [
    "GGUFFile",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "ModelFileError",
    "ModelNotFoundError",
    "Tokenizer",
    "check_gguf_file",
    "default_model_path",
    "load_model",
    "read_gguf",
    "tiny_config",
    "verify_default_model",
    "weights_from_gguf",
]

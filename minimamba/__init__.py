"""minimamba: a readable Mamba2 (SSD) language model.

The public API is imported lazily, so `import minimamba` is cheap and a tokenizer-only user never
pays for importing torch.
"""

_EXPORTS = {
    "Mamba2Config": "minimamba.config",
    "Mamba2LM": "minimamba.model",
    "from_pretrained": "minimamba.hub",
    "load_tokenizer": "minimamba.tokenizer",
    "Tokenizer": "minimamba.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minimamba' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)

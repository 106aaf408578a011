"""ripple-gguf: co-activation neuron placement for GGUF models and a sparse flash-offload runtime."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from ripple_gguf import RippleLlama` without importing llama_cpp on every `import ripple_gguf`
    if name == "RippleLlama":
        from .runtime import RippleLlama
        return RippleLlama
    raise AttributeError(f"module 'ripple_gguf' has no attribute {name!r}")

"""ripple-gguf: co-activation neuron placement for GGUF models and a sparse flash-offload runtime."""

__version__ = "0.1.0"

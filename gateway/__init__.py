"""infergate: a Triton-compatible gRPC gateway in front of model servers."""

__version__ = "0.1.0"

"""infergate: a Triton-compatible gRPC gateway in front of model servers.

This folder is the installed package's root, ``infergate``. The repository keeps its layers as
top-level folders (gateway/, router/, backends/, benchmarks/); pyproject.toml installs them as
``infergate.gateway``, ``infergate.router``, ``infergate.backends`` and ``infergate.benchmarks`` so
that no generic name lands at the top of site-packages.
"""

from infergate.gateway import __version__

__all__ = ["__version__"]

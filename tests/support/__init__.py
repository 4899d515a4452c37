"""Real processes for the tests: Triton (nvidia-pytriton), the gateway, Redis."""

#!/usr/bin/env python3
"""One inference call through the gateway with the unmodified Triton client; exit 0 when it answers.

    python deploy/sample_call.py [--gateway HOST:PORT] [--model NAME]

The compose stack runs it as ``docker compose -f deploy/compose.yaml run --rm sample-call``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="127.0.0.1:8001")
    parser.add_argument("--model", default="classifier")
    parser.add_argument("--timeout-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    rows = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
    tensor = triton.InferInput("INPUT", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    client = triton.InferenceServerClient(args.gateway)
    try:
        result = client.infer(args.model, [tensor], client_timeout=args.timeout_s)
    except InferenceServerException as exc:
        print(f"sample call failed: {exc.status()} {exc.message()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    variant = result.get_response().parameters["variant"].string_param
    print(f"model {args.model} answered through variant {variant}: PROBS {result.as_numpy('PROBS').round(3).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``--scenario observability``: five real gateways that differ only in tracing and monitoring, and a
real OTLP receiver; each answers, and spans arrive only from the gateways that sample them."""

from __future__ import annotations

import re

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import InferInput

from infergate.benchmarks.cpus import allowed_cpus, format_cpu_list, tree_cpu_s, usable_cpus
from infergate.benchmarks.observability_scenario import MODEL, observability

CALLS = 5


SPANS_PER_CALL = 3  # infergate/ModelInfer, infergate/route, infergate/backend (no auth, no batching)


def test_observability_scenario_serves_and_only_sampled_gateways_export(tmp_path):
    server_cpus = frozenset(sorted(usable_cpus())[:1])
    with observability(tmp_path, server_cpus) as targets:
        assert [t.name for t in targets] == ["gateway-plain", "gateway-monitoring", "gateway-trace-0",
                                             "gateway-trace-0.01", "gateway-trace-1"]
        for target in targets:
            # each gateway is pinned to the server CPUs and known by its process, for its CPU time per call
            assert target.pid is not None and allowed_cpus(target.pid) == format_cpu_list(server_cpus), target.name
            assert tree_cpu_s(target.pid) > 0
            client = grpcclient.InferenceServerClient(target.url)
            try:
                for _ in range(CALLS):
                    tensor = InferInput("INPUT", [1, 16], "FP32")
                    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
                    result = client.infer(MODEL, [tensor], client_timeout=30)
                    assert result.as_numpy("PROBS").shape == (1, 4), target.name
            finally:
                client.close()
    # The gateways stopped first (flushing their exporters), then the receiver printed its count.
    received = int(re.search(r"otlp sink received (\d+) spans", (tmp_path / "otlp-sink.log").read_text()).group(1))
    # Every call of trace-1, none of trace-0, rarely one of trace-0.01; each traced call exports its
    # server span and its stage spans (route, backend): SPANS_PER_CALL in all.
    assert CALLS * SPANS_PER_CALL <= received < 2 * CALLS * SPANS_PER_CALL

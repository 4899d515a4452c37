"""Wire compatibility of the gateway's generated protos with NVIDIA Triton's.

tritonclient ships Triton's own generated code (tritonclient.grpc.service_pb2 / model_config_pb2).
These tests check that gateway._proto.inference matches it: descriptors (names, numbers, types,
oneofs, enum values, service methods), byte-level round trips in both directions with every field
set, and a real tritonclient.grpc client talking to a servicer built on the generated stubs.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

import tritonclient.grpc as tritongrpc
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton_svc

from infergate.gateway._proto.inference import grpc_service_pb2 as svc
from infergate.gateway._proto.inference import grpc_service_pb2_grpc as svc_grpc
from infergate.gateway._proto.inference import model_config_pb2 as mc
from infergate.gateway._proto.infergate.admin.v1 import admin_pb2, admin_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------
# Descriptors
# --------------------------------------------------------------------------------------------------


def _field_signature(f: FieldDescriptor) -> tuple:
    return (
        f.name,
        f.number,
        f.type,
        f.is_repeated,
        f.message_type.full_name if f.message_type else None,
        f.enum_type.full_name if f.enum_type else None,
        f.containing_oneof.name if f.containing_oneof else None,
    )


def _compare_enum(theirs: EnumDescriptor, ours: EnumDescriptor, problems: list[str]) -> None:
    ours_values = {v.name: v.number for v in ours.values}
    for v in theirs.values:
        if ours_values.get(v.name) != v.number:
            problems.append(f"{theirs.full_name}.{v.name}: Triton {v.number}, ours {ours_values.get(v.name)}")


def _compare_message(theirs: Descriptor, ours: Descriptor, problems: list[str]) -> None:
    """Every Triton field/nested type/enum value must exist in ours, identically."""
    ours_fields = {f.number: f for f in ours.fields}
    for f in theirs.fields:
        mine = ours_fields.get(f.number)
        if mine is None:
            problems.append(f"{theirs.full_name}: missing field {f.name} = {f.number}")
        elif _field_signature(mine) != _field_signature(f):
            problems.append(
                f"{theirs.full_name}.{f.name}: Triton {_field_signature(f)}, ours {_field_signature(mine)}"
            )
    for name, nested in theirs.nested_types_by_name.items():
        if name not in ours.nested_types_by_name:
            problems.append(f"{theirs.full_name}: missing nested message {name}")
        else:
            _compare_message(nested, ours.nested_types_by_name[name], problems)
    for name, enum in theirs.enum_types_by_name.items():
        if name not in ours.enum_types_by_name:
            problems.append(f"{theirs.full_name}: missing enum {name}")
        else:
            _compare_enum(enum, ours.enum_types_by_name[name], problems)
    theirs_oneofs = {o.name: sorted(f.name for f in o.fields) for o in theirs.oneofs}
    ours_oneofs = {o.name: sorted(f.name for f in o.fields) for o in ours.oneofs}
    for name, members in theirs_oneofs.items():
        if ours_oneofs.get(name) != members:
            problems.append(f"{theirs.full_name}: oneof {name} Triton {members}, ours {ours_oneofs.get(name)}")


@pytest.mark.parametrize("theirs_mod, ours_mod", [(triton_mc, mc), (triton_svc, svc)], ids=["model_config", "grpc_service"])
def test_descriptors_cover_triton(theirs_mod, ours_mod):
    theirs, ours = theirs_mod.DESCRIPTOR, ours_mod.DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    problems: list[str] = []
    for name, msg in theirs.message_types_by_name.items():
        if name not in ours.message_types_by_name:
            problems.append(f"missing message inference.{name}")
        else:
            _compare_message(msg, ours.message_types_by_name[name], problems)
    for name, enum in theirs.enum_types_by_name.items():
        if name not in ours.enum_types_by_name:
            problems.append(f"missing enum inference.{name}")
        else:
            _compare_enum(enum, ours.enum_types_by_name[name], problems)
    assert not problems, "\n".join(problems)


def test_service_methods_match_triton():
    theirs = triton_svc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = svc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"

    def methods(service):
        return {
            f"/{service.full_name}/{m.name}": (
                m.input_type.full_name,
                m.output_type.full_name,
                m.client_streaming,
                m.server_streaming,
            )
            for m in service.methods
        }

    assert methods(ours) == methods(theirs)
    assert methods(ours)["/inference.GRPCInferenceService/ModelStreamInfer"] == (
        "inference.ModelInferRequest",
        "inference.ModelStreamInferResponse",
        True,
        True,
    )
    # The generated servicer registers one handler per method.
    assert {m.name for m in ours.methods} <= set(dir(svc_grpc.GRPCInferenceServiceServicer))


def test_contract_field_numbers():
    """The numbers callers rely on, pinned independently of tritonclient."""
    param = svc.InferParameter.DESCRIPTOR
    assert {f.name: f.number for f in param.oneofs_by_name["parameter_choice"].fields} == {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "double_param": 4,
        "uint64_param": 5,
    }
    contents = svc.InferTensorContents.DESCRIPTOR.fields_by_name
    assert [contents[n].number for n in (
        "bool_contents", "int_contents", "int64_contents", "uint_contents",
        "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents",
    )] == list(range(1, 9))
    assert svc.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number == 7
    assert svc.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number == 6
    stream = svc.ModelStreamInferResponse.DESCRIPTOR.fields_by_name
    assert (stream["error_message"].number, stream["infer_response"].number) == (1, 2)
    config = mc.ModelConfig.DESCRIPTOR.fields_by_name
    assert {n: config[n].number for n in ("name", "platform", "max_batch_size", "input", "output", "backend")} == {
        "name": 1, "platform": 2, "max_batch_size": 4, "input": 5, "output": 6, "backend": 17,
    }


# --------------------------------------------------------------------------------------------------
# Round trips with every field set
# --------------------------------------------------------------------------------------------------

_SCALARS = {
    FieldDescriptor.TYPE_BOOL: lambda i: True,
    FieldDescriptor.TYPE_INT32: lambda i: -7 - i,
    FieldDescriptor.TYPE_INT64: lambda i: -(2**40) - i,
    FieldDescriptor.TYPE_UINT32: lambda i: 2**31 + 3 + i,
    FieldDescriptor.TYPE_UINT64: lambda i: 2**63 + 5 + i,
    FieldDescriptor.TYPE_FLOAT: lambda i: 1.5 + i,
    FieldDescriptor.TYPE_DOUBLE: lambda i: 2.25e-3 + i,
    FieldDescriptor.TYPE_STRING: lambda i: f"s{i}-\u00e9",
    FieldDescriptor.TYPE_BYTES: lambda i: bytes([0, 255, 128, i % 256]),
}


def _scalar(field: FieldDescriptor, i: int):
    if field.type == FieldDescriptor.TYPE_ENUM:
        values = field.enum_type.values
        return values[-1 - (i % len(values))].number  # a non-default value first
    return _SCALARS[field.type](i)


def _choices(desc: Descriptor) -> int:
    return max([len(o.fields) for o in desc.oneofs] + [1])


def fill(msg, variant: int = 0, depth: int = 0) -> None:
    """Set every field of `msg` (recursively); `variant` picks which member of each oneof is set.

    Repeated message fields and maps get one element per oneof choice of the element type, so
    e.g. a parameters map holds all five InferParameter kinds.
    """
    if depth > 6:
        return
    desc = msg.DESCRIPTOR
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.fields[variant % len(oneof.fields)] is not field:
            continue
        value_field = field.message_type.fields_by_name["value"] if field.message_type and field.message_type.GetOptions().map_entry else None
        if value_field is not None:  # map
            key_field = field.message_type.fields_by_name["key"]
            container = getattr(msg, field.name)
            count = _choices(value_field.message_type) if value_field.message_type else 2
            for i in range(max(count, 2)):
                key = _scalar(key_field, i) if key_field.type != FieldDescriptor.TYPE_STRING else f"key{i}"
                if value_field.message_type:
                    fill(container[key], variant + i, depth + 1)
                else:
                    container[key] = _scalar(value_field, i)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for i in range(max(_choices(field.message_type), 2)):
                    fill(getattr(msg, field.name).add(), variant + i, depth + 1)
            else:
                sub = getattr(msg, field.name)
                sub.SetInParent()  # empty messages (e.g. ModelVersionPolicy.All) still count as set
                fill(sub, variant, depth + 1)
        elif field.is_repeated:
            getattr(msg, field.name).extend([_scalar(field, 0), _scalar(field, 1)])
        else:
            setattr(msg, field.name, _scalar(field, variant))


ROUND_TRIP = [
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelStreamInferResponse",
    "ModelConfigRequest",
    "ModelConfigResponse",
    "ModelStatisticsRequest",
    "ModelStatisticsResponse",
]


def _to_dict(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


@pytest.mark.parametrize("variant", range(5))
@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_every_field(name, variant):
    theirs_cls, ours_cls = getattr(triton_svc, name), getattr(svc, name)

    # Triton -> ours
    theirs = theirs_cls()
    fill(theirs, variant)
    wire = theirs.SerializeToString(deterministic=True)
    ours = ours_cls.FromString(wire)
    assert _to_dict(ours) == _to_dict(theirs)
    assert ours.SerializeToString(deterministic=True) == wire

    # ours -> Triton
    ours = ours_cls()
    fill(ours, variant)
    wire = ours.SerializeToString(deterministic=True)
    theirs = theirs_cls.FromString(wire)
    assert _to_dict(theirs) == _to_dict(ours)
    assert theirs.SerializeToString(deterministic=True) == wire


def test_fill_really_sets_everything():
    """Guard the generic filler: the messages the gateway serves are fully populated."""
    req = svc.ModelInferRequest()
    fill(req)
    kinds = {p.WhichOneof("parameter_choice") for p in req.parameters.values()}
    assert kinds == {"bool_param", "int64_param", "string_param", "double_param", "uint64_param"}
    tensor = req.inputs[0]
    for name in svc.InferTensorContents.DESCRIPTOR.fields_by_name:
        assert len(getattr(tensor.contents, name)) == 2, name
    assert req.raw_input_contents and req.outputs[0].parameters

    cfg = svc.ModelConfigResponse()
    fill(cfg)
    c = cfg.config
    assert c.input and c.output and c.instance_group and c.parameters
    assert c.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert c.dynamic_batching.preferred_batch_size and c.dynamic_batching.priority_queue_policy
    assert c.instance_group[0].gpus and c.instance_group[0].kind != mc.ModelInstanceGroup.KIND_AUTO

    stats = svc.ModelStatisticsResponse()
    fill(stats)
    s = stats.model_stats[0]
    assert s.inference_stats.success.ns and s.batch_stats and s.response_stats and s.memory_usage


def test_tritonclient_built_request_parses():
    """A request exactly as tritonclient.grpc builds it (raw contents, sequence/priority params)."""
    from tritonclient.grpc._utils import _get_inference_request

    a = tritongrpc.InferInput("INPUT0", [2, 3], "FP32")
    a.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    b = tritongrpc.InferInput("INPUT1", [2], "BYTES")
    b.set_data_from_numpy(np.array([b"ab", b"\x00\xff"], dtype=np.object_))
    out = tritongrpc.InferRequestedOutput("OUTPUT0", class_count=3)
    theirs = _get_inference_request(
        model_name="m", inputs=[a, b], model_version="2", request_id="r1", outputs=[out],
        sequence_id=42, sequence_start=True, sequence_end=False, priority=7, timeout=1000,
        parameters={"custom_double": 0.5, "custom_str": "x"},
    )
    ours = svc.ModelInferRequest.FromString(theirs.SerializeToString())
    assert _to_dict(ours) == _to_dict(theirs)
    assert [i.name for i in ours.inputs] == ["INPUT0", "INPUT1"]
    assert np.frombuffer(ours.raw_input_contents[0], dtype=np.float32).tolist() == [0, 1, 2, 3, 4, 5]
    # BYTES: 4-byte little-endian length prefix per element.
    assert ours.raw_input_contents[1] == b"\x02\x00\x00\x00ab\x02\x00\x00\x00\x00\xff"
    assert ours.parameters["sequence_id"].int64_param == 42
    assert ours.parameters["priority"].uint64_param == 7
    assert ours.parameters["custom_double"].double_param == 0.5
    assert ours.outputs[0].parameters["classification"].int64_param == 3


# --------------------------------------------------------------------------------------------------
# A real tritonclient against a servicer built on the generated code
# --------------------------------------------------------------------------------------------------


class _EchoServicer(svc_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return svc.ServerLiveResponse(live=True)

    def ModelMetadata(self, request, context):
        return svc.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform="gateway",
            inputs=[svc.ModelMetadataResponse.TensorMetadata(name="IN", datatype="INT64", shape=[-1, 2])],
            outputs=[svc.ModelMetadataResponse.TensorMetadata(name="OUT", datatype="INT64", shape=[-1, 2])],
        )

    def ModelConfig(self, request, context):
        return svc.ModelConfigResponse(
            config=mc.ModelConfig(
                name=request.name,
                max_batch_size=8,
                input=[mc.ModelInput(name="IN", data_type=mc.TYPE_INT64, dims=[2])],
                output=[mc.ModelOutput(name="OUT", data_type=mc.TYPE_INT64, dims=[2])],
                dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=500),
            )
        )

    def ModelInfer(self, request, context):
        data = np.frombuffer(request.raw_input_contents[0], dtype=np.int64) * 2
        response = svc.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="OUT", datatype="INT64", shape=request.inputs[0].shape)
        response.raw_output_contents.append(data.tobytes())
        response.parameters["variant"].string_param = "blue"
        return response

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            yield svc.ModelStreamInferResponse(infer_response=self.ModelInfer(request, context))


@pytest.fixture(scope="module")
def echo_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    svc_grpc.add_GRPCInferenceServiceServicer_to_server(_EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_tritonclient_talks_to_generated_servicer(echo_server):
    client = tritongrpc.InferenceServerClient(echo_server)
    try:
        assert client.is_server_live()
        meta = client.get_model_metadata("m")
        assert (meta.name, meta.inputs[0].shape) == ("m", [-1, 2])
        config = client.get_model_config("m").config
        assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 500

        inp = tritongrpc.InferInput("IN", [1, 2], "INT64")
        inp.set_data_from_numpy(np.array([[3, 4]], dtype=np.int64))
        result = client.infer("m", [inp], request_id="abc")
        assert result.as_numpy("OUT").tolist() == [[6, 8]]
        assert result.get_response().parameters["variant"].string_param == "blue"
        assert result.get_response().id == "abc"

        # An RPC the servicer does not implement answers UNIMPLEMENTED.
        with pytest.raises(tritongrpc.InferenceServerException) as err:
            client.get_model_repository_index()
        assert "UNIMPLEMENTED" in str(err.value.status())
    finally:
        client.close()


def test_tritonclient_stream(echo_server):
    import queue

    results: queue.Queue = queue.Queue()
    client = tritongrpc.InferenceServerClient(echo_server)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i in range(3):
            inp = tritongrpc.InferInput("IN", [1, 2], "INT64")
            inp.set_data_from_numpy(np.array([[i, i + 1]], dtype=np.int64))
            client.async_stream_infer("m", [inp], request_id=str(i))
        got = [results.get(timeout=10) for _ in range(3)]
        client.stop_stream()
    finally:
        client.close()
    assert all(error is None for _, error in got)
    assert sorted(r.as_numpy("OUT").tolist()[0][0] for r, _ in got) == [0, 2, 4]


# --------------------------------------------------------------------------------------------------
# Packaging: coexistence with tritonclient, admin proto, staleness
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first, second",
    [
        ("tritonclient.grpc", "gateway._proto.inference.grpc_service_pb2_grpc"),
        ("gateway._proto.inference.grpc_service_pb2_grpc", "tritonclient.grpc.aio"),
    ],
)
def test_imports_coexist_with_tritonclient_in_any_order(first, second):
    code = f"import {first}, {second}; import gateway._proto.infergate.admin.v1.admin_pb2_grpc"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_descriptor_pools():
    """inference.* lives in gateway._proto.pool.POOL (the default pool holds tritonclient's copy);
    the admin package lives in the default pool, where grpc reflection looks by default."""
    from google.protobuf import descriptor_pool

    from infergate.gateway._proto.pool import POOL

    assert POOL.FindFileContainingSymbol("inference.GRPCInferenceService").name == "inference/grpc_service.proto"
    assert POOL.FindMessageTypeByName("inference.ModelConfig").file.name == "inference/model_config.proto"
    default = descriptor_pool.Default()
    assert default.FindFileContainingSymbol("infergate.admin.v1.RoutingAdmin").name == "infergate/admin/v1/admin.proto"
    # tritonclient is imported by this module, so the default pool resolves Triton's own copy.
    assert default.FindFileContainingSymbol("inference.GRPCInferenceService").name == triton_svc.DESCRIPTOR.name


def test_admin_proto_shape():
    service = admin_pb2.DESCRIPTOR.services_by_name["RoutingAdmin"]
    assert service.full_name == "infergate.admin.v1.RoutingAdmin"
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods == {
        "ListRoutes": ("ListRoutesRequest", "ListRoutesResponse", False),
        "GetRoute": ("GetRouteRequest", "GetRouteResponse", False),
        "SetWeights": ("SetWeightsRequest", "RouteChangeResponse", False),
        "Promote": ("PromoteRequest", "RouteChangeResponse", False),
        "Rollback": ("RollbackRequest", "RouteChangeResponse", False),
        "GetAuditLog": ("GetAuditLogRequest", "GetAuditLogResponse", False),
        "WatchRoutes": ("WatchRoutesRequest", "RouteEvent", True),
    }
    assert hasattr(admin_pb2_grpc, "RoutingAdminStub")
    req = admin_pb2.SetWeightsRequest(model="m", weights={"a": 90, "b": 10}, expected_revision=3, reason="r")
    assert admin_pb2.SetWeightsRequest.FromString(req.SerializeToString()) == req


def test_generated_code_is_fresh():
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr

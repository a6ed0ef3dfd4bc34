"""An independent client (Python grpcio) sees the server's API through reflection and health.

The server binary comes from REASONALLOC_SERVER_BINARY (set by ctest).
"""
import os
import subprocess
import tempfile
import time

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


@pytest.fixture(scope="module")
def channel():
    binary = os.environ["REASONALLOC_SERVER_BINARY"]
    with tempfile.TemporaryDirectory(prefix="reasonalloc-py-") as tmp:
        sock = os.path.join(tmp, "s.sock")
        proc = subprocess.Popen(
            [binary, f"--listen=unix://{sock}", "--metrics_address=127.0.0.1:0"],
            stderr=subprocess.PIPE,
        )
        ch = grpc.insecure_channel(f"unix://{sock}")
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.time() + 20
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    break
            except grpc.RpcError:
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.05)
        yield ch
        ch.close()
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_reflection_lists_every_service(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert "reasonalloc.v1.KvSidecar" in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services


def test_reflection_describes_the_api(channel):
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("reasonalloc.v1.KvSidecar")
    methods = {m.name for m in service.methods}
    for name in ("GetServerInfo", "CreateSession", "GetSession", "ListSessions", "CloseSession",
                 "KeepAlive", "UpdateBudget", "Compress", "CompressStream", "WatchMetrics",
                 "GetProfile", "PutProfile", "StartCalibration", "FinishCalibration"):
        assert name in methods
    tensor = pool.FindMessageTypeByName("reasonalloc.v1.Tensor")
    assert [f.name for f in tensor.fields] == ["dtype", "shape", "data"]


def test_health_check_and_watch(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    ok = stub.Check(health_pb2.HealthCheckRequest(service="reasonalloc.v1.KvSidecar"))
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=2)
    first = next(watch)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()

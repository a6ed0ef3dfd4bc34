"""Python client of the ReasonAlloc KV-cache sidecar.

    from reasonalloc import Client
    with Client("unix:///run/reasonalloc/sidecar.sock") as client:
        model = dict(name="m", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64,
                     dtype="float16")
        with client.session(model, budget=128, scorer="rkv", allocator="reasonalloc",
                            mode="head", gqa_reduce="mean", memory="host_shm") as s:
            s.append(step, k, v, q)     # write one token into every head and the query ring
            s.compress(step)            # the sidecar decides and compacts in place
            keys = s.keys(layer, head)  # NumPy view of a head's live rows

Sessions with memory="host_shm" expose NumPy views over the server's shared-memory arenas (layout
version 1); memory="inline" sessions send tensors in the request. AsyncClient (reasonalloc.aio) is
the asyncio twin of Client. The generated stubs are reasonalloc.v1.{types_pb2, sidecar_pb2,
sidecar_pb2_grpc}.
"""
__version__ = "0.2.0"

from reasonalloc import _proto

_proto.load()  # reasonalloc.v1: packaged in a wheel; generated once for a source checkout

from reasonalloc._common import TOKEN_KEY, ReasonAllocWarning, SidecarError  # noqa: E402
from reasonalloc.aio import (AsyncClient, AsyncCompressStream, AsyncMetricsStream,  # noqa: E402
                             AsyncSession)
from reasonalloc.client import Client, CompressStream, MetricsStream, Session  # noqa: E402

__all__ = ["Client", "Session", "CompressStream", "MetricsStream", "AsyncClient", "AsyncSession",
           "AsyncCompressStream", "AsyncMetricsStream", "SidecarError", "ReasonAllocWarning",
           "TOKEN_KEY", "__version__"]

"""Python client of the ReasonAlloc KV-cache sidecar.

    from reasonalloc import Client
    with Client("unix:///run/reasonalloc/sidecar.sock") as client:
        with client.session(model=dict(name="m", num_layers=2, num_q_heads=4, num_kv_heads=2,
                                       head_dim=64, dtype="float16"),
                            budget=128, scorer="rkv", memory="host_shm") as s:
            s.append(step, k, v, q)     # write one token into every head and the query ring
            s.compress(step)            # the sidecar decides and compacts in place
            keys = s.keys(layer, head)  # NumPy view of a head's live rows

Sessions with memory="host_shm" expose NumPy views over the server's shared-memory arenas (layout
version 1, see the repository README); memory="inline" sessions send tensors in the request.
"""
from reasonalloc.client import Client, Session, SidecarError  # noqa: F401

__all__ = ["Client", "Session", "SidecarError"]

"""Session options without a server: enum spellings derived from the proto's descriptors, every
config field reachable from session(), the request they build."""
import inspect

import pytest

from reasonalloc import AsyncClient, Client, _common, _enums
from reasonalloc.v1 import sidecar_pb2, types_pb2

ENUMS = [types_pb2.DType, types_pb2.PoolKind, types_pb2.GqaReduce, types_pb2.SessionMode,
         types_pb2.MemoryKind, types_pb2.AllocatorConfig.ReasonAllocMode]
MODEL = dict(name="m", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8)


def test_short_names_strip_the_common_prefix():
    assert _enums.short_names(types_pb2.GqaReduce.DESCRIPTOR) == {
        "unspecified": 0, "max": 1, "mean": 2, "mean_scores": 3}
    assert _enums.short_names(types_pb2.AllocatorConfig.ReasonAllocMode.DESCRIPTOR) == {
        "unspecified": 0, "layer": 1, "head": 2, "full": 3, "off": 4, "static": 5}
    assert _enums.short_names(types_pb2.MemoryKind.DESCRIPTOR) == {
        "unspecified": 0, "inline": 1, "host_shm": 2, "cuda_ipc": 3}


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.DESCRIPTOR.name)
def test_every_value_parses_in_both_spellings(enum):
    d = enum.DESCRIPTOR
    for value in d.values:
        short = _enums.short_name(d, value.number)
        for spelling in (short, short.upper(), short.replace("_", "-"), value.name,
                         value.name.lower(), value.number):
            assert _enums.parse(d, spelling, "p") == value.number, spelling
    assert _enums.parse(d, None, "p") == 0


@pytest.mark.parametrize("bad", ["median", "GQA_REDUCE_MEDIAN", "", "POOL_KIND_MAX", 7, True, 1.0])
def test_an_unknown_spelling_names_the_parameter_and_the_accepted_ones(bad):
    with pytest.raises(ValueError) as e:
        _enums.parse(types_pb2.GqaReduce.DESCRIPTOR, bad, "gqa_reduce")
    message = str(e.value)
    assert message.startswith("gqa_reduce: ")
    for accepted in ("max", "mean", "mean_scores", "GQA_REDUCE_MEAN_SCORES"):
        assert accepted in message


def test_the_request_from_plain_strings():
    r = _common.create_session_request(
        dict(MODEL, dtype="bfloat16"), 64, "rkv", "reasonalloc", mode="head", gqa_reduce="mean",
        pool_kind="avg", memory="inline", managed=False, sinks=0, recent=16, window=8,
        buffer=32, lambda_=0.3, threshold=0.4, layer_exponent=0.7, profile="p",
        lease_seconds=5, client_tag="t")
    assert r.model.dtype == types_pb2.DTYPE_BFLOAT16 and r.model.max_context == 131072
    assert r.scorer.gqa_reduce == types_pb2.GQA_REDUCE_MEAN
    assert r.scorer.pool_kind == types_pb2.POOL_KIND_AVG
    assert getattr(r.scorer, "lambda") == pytest.approx(0.3) and r.scorer.threshold == 0.4
    assert r.allocator.reasonalloc_mode == types_pb2.AllocatorConfig.REASONALLOC_MODE_HEAD
    assert r.allocator.layer_exponent == 0.7 and r.allocator.profile == "p"
    assert not r.allocator.HasField("head_exponent")  # unset: the server's default
    assert r.budget.HasField("sinks") and r.budget.sinks == 0 and r.budget.recent == 16
    assert r.memory == types_pb2.MEMORY_KIND_INLINE
    assert r.mode == types_pb2.SESSION_MODE_ADVISORY
    assert (r.lease_seconds, r.client_tag) == (5, "t")
    default = _common.create_session_request(MODEL, 64)
    assert not default.budget.HasField("sinks") and not default.scorer.HasField("lambda")
    assert default.scorer.gqa_reduce == 0 and default.allocator.reasonalloc_mode == 0


def test_model_errors_name_the_key():
    with pytest.raises(ValueError, match="model.dtype"):
        _common.create_session_request(dict(MODEL, dtype="float8"), 64)
    with pytest.raises(ValueError, match="num_heads"):
        _common.create_session_request(dict(MODEL, num_heads=4), 64)
    with pytest.raises(ValueError, match="head_dim"):
        _common.create_session_request({k: v for k, v in MODEL.items() if k != "head_dim"}, 64)


def test_session_exposes_every_field_of_the_configs():
    params = set(inspect.signature(_common.create_session_request).parameters)
    renamed = {("ScorerConfig", "name"): "scorer", ("ScorerConfig", "lambda"): "lambda_",
               ("AllocatorConfig", "name"): "allocator",
               ("AllocatorConfig", "reasonalloc_mode"): "mode",
               ("CreateSessionRequest", "mode"): "managed"}
    messages = [types_pb2.BudgetConfig, types_pb2.ScorerConfig, types_pb2.AllocatorConfig,
                sidecar_pb2.CreateSessionRequest]
    missing = []
    for message in messages:
        for field in message.DESCRIPTOR.fields:
            if field.message_type is not None:  # model, budget, scorer, allocator themselves
                continue
            name = renamed.get((message.DESCRIPTOR.name, field.name), field.name)
            if name not in params:
                missing.append(f"{message.DESCRIPTOR.name}.{field.name}")
    assert missing == []
    assert {"model", "budget"} <= params


def test_client_session_and_async_session_take_the_same_arguments():
    want = list(inspect.signature(_common.create_session_request).parameters.values())
    for method in (Client.session, AsyncClient.session):
        got = list(inspect.signature(method).parameters.values())
        assert got[0].name == "self" and got[-1].name == "keep_alive"
        assert got[1:-1] == want, method


def test_every_rpc_has_a_wrapper_in_both_clients():
    wrappers = {"GetServerInfo": "get_server_info", "CreateSession": "session"}
    for method in sidecar_pb2.DESCRIPTOR.services_by_name["KvSidecar"].methods:
        snake = "".join("_" + c.lower() if c.isupper() else c for c in method.name).lstrip("_")
        name = wrappers.get(method.name, snake)
        assert callable(getattr(Client, name, None)), name
        assert callable(getattr(AsyncClient, name, None)), name
        for cls in (Client, AsyncClient):
            assert getattr(cls, name).__doc__, f"{cls.__name__}.{name} has no docstring"

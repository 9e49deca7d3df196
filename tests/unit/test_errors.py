"""One error vocabulary: the cores raise lfr.errors; the shared gRPC edge maps them to statuses once.

A real grpc.aio server with the runtime's ErrorInterceptor, and handlers that raise what cores raise: each
refusal arrives as its status with its message, on unary and streaming calls; anything else is INTERNAL with a
generic message.
"""

from __future__ import annotations

import grpc
import pytest

from lfr import errors
from lfr.runtime import limits
from lfr.runtime.service import ErrorInterceptor

RAISED = {
    "invalid": errors.Invalid("deployment_id is required"),
    "not_found": errors.Refused("NOT_FOUND", "no deployment 'd-1'"),
    "precondition": errors.FailedPrecondition("deployment d-1 is ENDED, not ACTIVE"),
    "denied": errors.PermissionDenied("alice built the watchlist and cannot authorise it"),
    "too_large": limits.InputTooLarge("frame of 9 bytes exceeds the limit of 8"),
    "passed_on": errors.Refused("DEADLINE_EXCEEDED", "the embedding service did not answer"),
    "long": errors.Invalid("x" * 5000),
    "bug": KeyError("secret detail"),
}
EXPECTED = {
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "deployment_id is required"),
    "not_found": (grpc.StatusCode.NOT_FOUND, "no deployment 'd-1'"),
    "precondition": (grpc.StatusCode.FAILED_PRECONDITION, "deployment d-1 is ENDED, not ACTIVE"),
    "denied": (grpc.StatusCode.PERMISSION_DENIED, "alice built the watchlist and cannot authorise it"),
    "too_large": (grpc.StatusCode.RESOURCE_EXHAUSTED, "frame of 9 bytes exceeds the limit of 8"),
    "passed_on": (grpc.StatusCode.DEADLINE_EXCEEDED, "the embedding service did not answer"),
}


def test_refused_with_a_status_name_is_the_typed_error():
    assert type(errors.Refused("NOT_FOUND", "m")) is errors.NotFound
    assert type(errors.Refused("INVALID_ARGUMENT", "m")) is errors.Invalid
    e = errors.Refused("FAILED_PRECONDITION", "window closed")
    assert isinstance(e, errors.FailedPrecondition) and e.code == "FAILED_PRECONDITION" and e.message == "window closed"
    assert errors.NotFound("gone").code == "NOT_FOUND" and str(errors.NotFound("gone")) == "gone"
    with pytest.raises(ValueError, match="not a gRPC status name"):
        errors.Refused("NOPE", "m")
    # the input checks are the same vocabulary (and still ValueErrors)
    for cls, kind in ((limits.InputInvalid, errors.Invalid), (limits.InputTooLarge, errors.ResourceExhausted),
                      (limits.InputNotAllowed, errors.PermissionDenied), (limits.InputNotFound, errors.NotFound)):
        e = cls("m")
        assert isinstance(e, kind) and isinstance(e, ValueError) and e.code == kind.code


def test_every_status_name_is_grpcs():
    assert set(errors.STATUS_NAMES) == {c.name for c in grpc.StatusCode} - {"OK"}
    assert all(hasattr(grpc.StatusCode, code) for code in errors.BY_CODE)


def test_the_cores_raise_the_vocabulary():
    from lfr.embedding.core import ChipError
    from lfr.watchlist.core import DeploymentRecord

    assert issubclass(ChipError, errors.Invalid)
    d = DeploymentRecord(id="d-1", name="x", purpose="p", site="s", planned_start_ns=0, planned_end_ns=10,
                         cameras=("c1",), threshold=0.5, model_id="m", model_version="1")
    with pytest.raises(errors.FailedPrecondition, match="DRAFT"):  # a draft cannot start
        d.start(5, "")
    with pytest.raises(errors.Invalid, match="actor"):
        d.changed_by("")


@pytest.fixture
async def server():
    async def unary(request: bytes, context):
        raise RAISED[request.decode()]

    async def stream(request: bytes, context):
        yield b"first"
        raise RAISED[request.decode()]

    handler = grpc.method_handlers_generic_handler("test.Errors", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    })
    srv = grpc.aio.server(interceptors=[ErrorInterceptor("test")])
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await srv.stop(None)


async def test_the_edge_maps_each_refusal_to_its_status_once(server):
    async with grpc.aio.insecure_channel(server) as ch:
        unary = ch.unary_unary("/test.Errors/Unary")
        stream = ch.unary_stream("/test.Errors/Stream")
        for name in RAISED:
            for call in ("unary", "stream"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    if call == "unary":
                        await unary(name.encode(), timeout=10)
                    else:
                        got = [m async for m in stream(name.encode(), timeout=10)]
                        assert got == [b"first"]
                err = info.value
                if name in EXPECTED:
                    assert (err.code(), err.details()) == EXPECTED[name], (name, call)
                elif name == "long":  # bounded like every status message (a trailer over 8 KiB is refused)
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert err.details().endswith("(truncated)") and len(err.details()) < 1100
                else:  # an unexpected exception: INTERNAL, and nothing of its detail leaks to the caller
                    assert err.code() == grpc.StatusCode.INTERNAL, (name, call)
                    assert "secret" not in err.details()

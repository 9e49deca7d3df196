"""Envelope helpers: every event carries its capture time, and every stage measures age against it."""

from __future__ import annotations

import time
import uuid

from google.protobuf.timestamp_pb2 import Timestamp

from lfr.pb import common_pb2


def now_ts() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def ts_from_ns(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def new_id() -> str:
    return uuid.uuid4().hex


def envelope(producer: str, deployment_id: str = "", camera_id: str = "", capture_ns: int | None = None,
             trace_id: str = "", model_id: str = "", model_version: str = "") -> common_pb2.Envelope:
    return common_pb2.Envelope(
        event_id=new_id(),
        capture_time=ts_from_ns(capture_ns if capture_ns is not None else time.time_ns()),
        deployment_id=deployment_id,
        camera_id=camera_id,
        producer=producer,
        trace_id=trace_id or new_id(),
        model_id=model_id,
        model_version=model_version,
        emit_time=now_ts(),
    )


def derive(env: common_pb2.Envelope, producer: str, model_id: str = "", model_version: str = "") -> common_pb2.Envelope:
    """The envelope of an event produced from another: same capture time, deployment, camera and trace."""
    out = common_pb2.Envelope()
    out.CopyFrom(env)
    out.event_id = new_id()
    out.producer = producer
    out.emit_time.CopyFrom(now_ts())
    if model_id:
        out.model_id, out.model_version = model_id, model_version
    return out


def age_ms(env: common_pb2.Envelope) -> float:
    return (time.time_ns() - env.capture_time.ToNanoseconds()) / 1e6

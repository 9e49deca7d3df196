"""Fuzz the external gRPC APIs of one embedded system (real services, mutual TLS, real tokens).

Three parts, for every method of the six services: (a) hypothesis-generated protobuf messages built from each
request type's descriptor (and valid requests with fields replaced, to get past the first checks: an ACTIVE
deployment takes pushed frames through the whole pipeline), sent by callers holding every role, plus 4 KB
strings in every field; (b) malformed protobuf bodies (random and truncated bytes, hand-made wire format
errors); (c) calls without valid credentials or with the wrong role. Every answer must be a proper status that
reached the client (never UNKNOWN, INTERNAL or UNAVAILABLE), a body that does not parse must be
INVALID_ARGUMENT, refusals must be exact, and afterwards every service process is alive, SERVING, and has
logged no error. Deterministic (``derandomize``); run with ``-s`` for the status counts.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lfr.bench.abuse import ApiMethod, api_methods, bearer, call, jpeg_bomb, png_bomb, tiny_image
from lfr.cli.live import create_deployment, enroll
from lfr.pb import (
    audit_pb2,
    common_pb2,
    detection_pb2,
    embedding_pb2,
    identification_pb2,
    ingest_pb2,
    watchlist_pb2,
)
from lfr.runtime import events
from lfr.runtime.access import Access
from lfr.runtime.devidp import find_dev_idp
from lfr.runtime.embedded import SERVICES, check_health
from lfr.runtime.paths import data_dir
from lfr.runtime.security import POLICY, ROLES

METHODS = api_methods()
ALLOWED = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "PERMISSION_DENIED",
                     "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "ALREADY_EXISTS", "DEADLINE_EXCEEDED",
                     "ABORTED", "CANCELLED", "UNIMPLEMENTED"})  # never UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS
EXAMPLES = {"structured": 100, "structured_stream": 20, "malformed": 30, "refused": 3}  # per method (x 8 kinds)
FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
SUBJECTS = [f"fuzz-{i:02d}" for i in range(32)]  # round robin: no fuzz caller comes near the rate limit
SELF = "\x00<the caller>"  # an `actor` drawn as this becomes the token's subject (another name is refused early)
MAX_DEPTH = 3
STATS: Counter = Counter()  # (part, status) -> calls
KNOWN: list[str] = []  # ids, names and paths of the system under test (filled by the fixture), drawn as strings
IMAGES: list[bytes] = []  # valid and hostile images (filled by the fixture), drawn as bytes


# ---------------------------------------------------------------------------------------------------------------
# strategies from descriptors
# ---------------------------------------------------------------------------------------------------------------
def _ints(bits: int, signed: bool = True) -> st.SearchStrategy[int]:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    edges = sorted({lo, lo + 1, hi - 1, hi, 0, 1, 2, 3, 10, 100, 112, 128, 1000, 10**6} | ({-1} if signed else set()))
    return st.one_of(st.sampled_from(edges), st.integers(-3 if signed else 0, 300), st.integers(lo, hi))


def _floats(width: int) -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, -1e-45, 3.4e38, -3.4e38, 0.5, 1.0, -1.0, 1.0001, 2.0]
    return st.one_of(st.sampled_from(edges), st.floats(-2.0, 2.0, width=width), st.floats(width=width))


SPECIAL_STRINGS = [
    "", " ", "\x00", "\t\n", "a", "x" * 65, "../../../etc/passwd", "/etc/passwd", "/etc", "/dev/zero", "/proc/self/environ",
    "/", ".", "..", "~", "C:\\Windows\\win.ini", "file:///etc/passwd", "http://169.254.169.254/latest/meta-data/",
    "rtsp://127.0.0.1:1/stream", "rtsp://user:secret@camera.invalid:554/s", "rtsps://[::1]:99999/x", "rtsp://",
    "concat:/etc/passwd|/etc/hosts", "subfile,,start,0,end,10,,:/etc/passwd", "pipe:0", "-i", "%s%s%n%x",
    "' OR 1=1 --", "\"; DROP TABLE alerts; --", "*", ">", "lfr.>", "a.b.c", "a b", "deployment.*.alerts",
    "{\"json\": true}", "null", "NaN", "-1", "0", "1e309", "9" * 40, "2024-01-01", "2024-02-30", "0001-01-01",
    "9999-12-31", "10000-01-01", "2024-13-45", "1970-01-01T00:00:00Z", "yesterday", "\u202e\ufeff\u200b",
    "\U0001f600" * 300, "e\u0301" * 50, "\ud7ff\ue000\uffff", "ß" * 2000, "a" * 4096,
]
TEXT = st.characters(blacklist_categories=("Cs",))
STRINGS = st.one_of(
    st.sampled_from(SPECIAL_STRINGS),
    st.integers(0, 10**6).map(lambda i: KNOWN[i % len(KNOWN)] if KNOWN else ""),
    st.text(TEXT, max_size=40),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=24),
    st.builds(lambda c, n: c * n, TEXT, st.integers(256, 1024)),  # huge-ish: at most 4 KB of UTF-8
)
BYTES = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=65, max_size=4096),
    st.integers(0, 10**6).map(lambda i: IMAGES[i % len(IMAGES)] if IMAGES else b""),
    st.tuples(st.integers(0, 10**6), st.integers(0, 4096)).map(  # a valid image, truncated
        lambda t: IMAGES[t[0] % len(IMAGES)][: t[1]] if IMAGES else b""),
)
SCALARS = {
    FD.TYPE_DOUBLE: _floats(64), FD.TYPE_FLOAT: _floats(32), FD.TYPE_BOOL: st.booleans(),
    FD.TYPE_INT32: _ints(32), FD.TYPE_SINT32: _ints(32), FD.TYPE_SFIXED32: _ints(32),
    FD.TYPE_INT64: _ints(64), FD.TYPE_SINT64: _ints(64), FD.TYPE_SFIXED64: _ints(64),
    FD.TYPE_UINT32: _ints(32, False), FD.TYPE_FIXED32: _ints(32, False),
    FD.TYPE_UINT64: _ints(64, False), FD.TYPE_FIXED64: _ints(64, False),
    FD.TYPE_STRING: STRINGS, FD.TYPE_BYTES: BYTES,
}


def _chip(size: int, fill: int, model_id: str) -> common_pb2.Chip:
    return common_pb2.Chip(size=size, rgb=bytes([fill]) * (size * size * 3), model_id=model_id)


# Extra values for messages whose fields only make sense together (to get past the first check now and then).
HINTS: dict[str, st.SearchStrategy] = {
    "lfr.common.v1.Chip": st.builds(_chip, st.sampled_from([0, 1, 16, 112, 150]), st.integers(0, 255),
                                    st.sampled_from(["", "sface-2021dec", "dlib-resnet-v1", "x"])),
    "lfr.common.v1.Vector": st.builds(
        lambda values, model: common_pb2.Vector(values=values, model_id=model),
        st.lists(_floats(32), min_size=128, max_size=128) | st.lists(st.just(0.08838835), min_size=128, max_size=128),
        st.sampled_from(["", "sface-2021dec", "dlib-resnet-v1"])),
    "google.protobuf.Timestamp": st.builds(
        lambda s, n: Timestamp(seconds=s, nanos=n),
        st.integers(int(time.time()) - 86400, int(time.time()) + 86400), st.integers(0, 999_999_999)),
}


def _enum(f) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), _ints(32))


def _set(msg, f, value) -> None:
    """Set field ``f`` of ``msg`` to a drawn value (a map field is drawn as a list of its entry messages)."""
    if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
        target = getattr(msg, f.name)
        for entry in value:
            if entry.DESCRIPTOR.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                target[entry.key].CopyFrom(entry.value)
            else:
                target[entry.key] = entry.value
    elif f.is_repeated:
        getattr(msg, f.name).extend(value)
    elif f.type == FD.TYPE_MESSAGE:
        getattr(msg, f.name).CopyFrom(value)
    else:
        setattr(msg, f.name, value)  # a later member of a oneof replaces an earlier one: fine


def _build(cls, values: dict):
    msg = cls()
    for name, value in values.items():
        _set(msg, cls.DESCRIPTOR.fields_by_name[name], value)
    return msg


def _field_strategy(f, depth: int) -> st.SearchStrategy | None:
    """Values of one field (a list for a repeated one); None for a message below MAX_DEPTH."""
    if depth == 0 and f.name == "actor" and f.type == FD.TYPE_STRING:
        s = st.sampled_from(["", SELF])
    elif f.type == FD.TYPE_MESSAGE:
        if depth >= MAX_DEPTH:
            return None
        s = message_strategy(f.message_type.full_name, depth + 1)
    elif f.type == FD.TYPE_ENUM:
        s = _enum(f)
    else:
        s = SCALARS[f.type]
    if f.is_repeated:
        s = st.lists(s, max_size=3 if f.type in (FD.TYPE_BYTES, FD.TYPE_MESSAGE) else 8)
    return s


@cache
def message_strategy(full_name: str, depth: int = 0) -> st.SearchStrategy:
    """Messages of a type: each field absent or drawn (scalars with their extremes, bounded strings, bytes and
    repeated fields, enums with unknown values, nested messages to MAX_DEPTH). ``actor`` of a request (depth 0)
    is empty or SELF. A request type with a TEMPLATE is also drawn as that valid request with 1-2 fields
    replaced, which gets past the first checks to the deeper ones."""
    from google.protobuf import descriptor_pool, message_factory

    desc = descriptor_pool.Default().FindMessageTypeByName(full_name)
    fields = {f.name: s for f in desc.fields if (s := _field_strategy(f, depth)) is not None}
    generic = st.fixed_dictionaries({}, optional=fields).map(partial(_build, message_factory.GetMessageClass(desc)))
    options = [generic]
    if full_name in HINTS:
        options.append(HINTS[full_name])
    if depth == 0 and full_name in TEMPLATES:
        options.append(_mutated(full_name))
    return st.one_of(options)


@st.composite
def _mutated(draw, full_name: str):
    msg = TEMPLATES[full_name]()
    desc = msg.DESCRIPTOR
    for name in draw(st.lists(st.sampled_from([f.name for f in desc.fields]), max_size=2, unique=True)):
        f = desc.fields_by_name[name]
        strategy = _field_strategy(f, 0)
        if strategy is None:
            continue
        msg.ClearField(name)
        _set(msg, f, draw(strategy))
    return msg


def _face() -> bytes:
    return FACE[0] if FACE else b""


def _ts(offset_s: float) -> Timestamp:
    return events.ts_from_ns(time.time_ns() + int(offset_s * 1e9))


# Valid requests (for the system the fixture prepares), built when drawn.
TEMPLATES: dict[str, Callable[[], object]] = {
    "lfr.watchlist.v1.CreateDeploymentRequest": lambda: watchlist_pb2.CreateDeploymentRequest(
        name="fuzz", purpose="fuzzing", legal_basis="testing", site="demo site", cameras=["fuzz-camera"],
        planned_start=_ts(-60), planned_end=_ts(3600), actor=SELF),
    "lfr.watchlist.v1.EnrollEntryRequest": lambda: watchlist_pb2.EnrollEntryRequest(
        deployment_id=TEMPLATE_IDS["deployment"], subject_ref="fuzz-subject", category=1, images=[_face()],
        legal_basis="testing", source_system="fuzz", captured_at=[_ts(-86400)], actor=SELF),
    "lfr.watchlist.v1.AddReferenceRequest": lambda: watchlist_pb2.AddReferenceRequest(
        subject_ref="fuzz-subject", images=[_face()], legal_basis="testing", source_system="fuzz",
        captured_at=[_ts(-86400)], actor=SELF),
    "lfr.watchlist.v1.AddFromReferenceRequest": lambda: watchlist_pb2.AddFromReferenceRequest(
        deployment_id=TEMPLATE_IDS["deployment"], subject_refs=["fuzz-subject"], category=2, actor=SELF),
    "lfr.identification.v1.AddGalleryImagesRequest": lambda: identification_pb2.AddGalleryImagesRequest(
        gallery="fuzz-gallery", subject_ref="fuzz-subject", images=[_face()], legal_basis="testing",
        source_system="fuzz", actor=SELF),
    "lfr.identification.v1.IdentifyRequest": lambda: identification_pb2.IdentifyRequest(
        image=_face(), gallery="fuzz-gallery", case_reference="case-1", justification="fuzzing", k=3, actor=SELF),
    "lfr.identification.v1.SubmitJobRequest": lambda: identification_pb2.SubmitJobRequest(
        media=[identification_pb2.MediaSource(path=TEMPLATE_IDS["image"])], gallery="fuzz-gallery",
        case_reference="case-1", justification="fuzzing", actor=SELF),
    "lfr.watchlist.v1.SearchRequest": lambda: watchlist_pb2.SearchRequest(
        deployment_id=TEMPLATE_IDS["deployment"], k=1,
        probes=[watchlist_pb2.Probe(vectors=[common_pb2.Vector(values=[0.08838835] * 128)])]),
    "lfr.detection.v1.DetectRequest": lambda: detection_pb2.DetectRequest(image=_face(), include_chips=True),
    "lfr.embedding.v1.EmbedRequest": lambda: embedding_pb2.EmbedRequest(chips=[_chip(112, 128, "")]),
    "lfr.ingest.v1.StartSourceRequest": lambda: ingest_pb2.StartSourceRequest(
        deployment_id=TEMPLATE_IDS["live"], camera_id="fuzz-camera", url=TEMPLATE_IDS["image"], target_fps=5),
    "lfr.ingest.v1.PushFrameRequest": lambda: ingest_pb2.PushFrameRequest(  # through the live pipeline
        deployment_id=TEMPLATE_IDS["live"], camera_id="fuzz-camera", image=_face(), capture_time=_ts(0),
        frame_index=1, video_time_s=0.1),
    "lfr.audit.v1.QueryRequest": lambda: audit_pb2.QueryRequest(limit=10, type_prefix="access."),
    "lfr.audit.v1.PeriodRequest": lambda: audit_pb2.PeriodRequest(from_date="2024-01-01", to_date="2030-12-31"),
}
TEMPLATE_IDS: dict[str, str] = {"deployment": "", "live": "", "image": ""}  # filled by the fixture
FACE: list[bytes] = []


def request_strategy(method: ApiMethod) -> st.SearchStrategy:
    s = message_strategy(method.request.DESCRIPTOR.full_name)
    return st.lists(s, max_size=3) if method.client_streaming else s


HANDMADE = [  # wire format errors a parser must survive
    b"\x0a\x02\xff\xfe",  # field 1, a string of invalid UTF-8 (or a message that then fails)
    b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
    b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # a varint longer than 10 bytes
    b"\x08" + b"\xff" * 11,
    b"\x0b" * 200,  # start-group markers without ends
    b"\x0f\x00",  # wire type 7
    b"\x00\x00",  # field number 0
    b"\xf8\xff\xff\xff\xff\x01\x00",  # field number over 2^29
    b"\x12\x7f" + b"\x0a\x7f" * 60,  # nested lengths that do not add up
    (b"\x0a\x02" * 120)[:-1],
]


def _truncated(parts: tuple) -> bytes:
    msg, cut, tail = parts
    raw = msg.SerializeToString()
    return raw[: min(cut, max(0, len(raw) - 1))] + tail


@cache
def malformed_strategy(method: ApiMethod) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(min_size=1, max_size=256),
        st.tuples(message_strategy(method.request.DESCRIPTOR.full_name), st.integers(0, 4096),
                  st.binary(max_size=3)).map(_truncated),
        st.sampled_from(HANDMADE),
    )


# ---------------------------------------------------------------------------------------------------------------
# the system under test
# ---------------------------------------------------------------------------------------------------------------
class Caller:
    """Channels with the client certificate (tokens per call), tokens, and the bookkeeping of the calls."""

    def __init__(self, system):
        self.system = system
        self.idp = find_dev_idp(system.state_dir)
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        access = Access(system.state_dir / "security" / "tls", "client")
        self.channels = {s: access.channel(system.endpoint(s), options=opts) for s in SERVICES}
        self.tokens = {s: self.idp.mint(s, ttl_s=3600, roles=sorted(ROLES)) for s in SUBJECTS}
        self.turn = itertools.count()

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()

    def subject(self) -> str:
        return SUBJECTS[next(self.turn) % len(SUBJECTS)]

    def send(self, part: str, method: ApiMethod, body: bytes | list[bytes], metadata) -> tuple[str, str]:
        code, details = call(self.channels[method.service], method, body, metadata, timeout=30.0,
                             stream_timeout=0.5)
        STATS[(part, code)] += 1
        if code == "RESOURCE_EXHAUSTED" and "rate limit" in details:
            STATS[(part, "rate limited")] += 1
        return code, details


def _media(folder: Path) -> list[str]:
    """Files inside the system's media roots: a small image, a truncated one, a bomb, a link leading out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.png").write_bytes(tiny_image("PNG", 32))
    (folder / "truncated.jpg").write_bytes(tiny_image("JPEG", 64)[:100])
    (folder / "bomb.png").write_bytes(png_bomb())
    (folder / "notes.mp4").write_bytes(b"not a video")
    (folder / "escape.jpg").symlink_to("/etc/passwd")
    return [str(folder), *(str(p) for p in sorted(folder.iterdir())), str(folder / "absent.jpg")]


@pytest.fixture(scope="module")
def caller(system, clients, tmp_path_factory):
    c = Caller(system)
    builder = "fuzz-builder"
    stub = c.channels["watchlist"].unary_unary(
        "/lfr.watchlist.v1.WatchlistService/CreateDeployment", watchlist_pb2.CreateDeploymentRequest.SerializeToString,
        watchlist_pb2.Deployment.FromString)
    ids = []
    for name in ("fuzz-a", "fuzz-b", "fuzz-template"):  # real ids, so that calls get past "no such deployment"
        d = stub(watchlist_pb2.CreateDeploymentRequest(
            name=name, purpose="fuzzing", legal_basis="testing", site="demo site", cameras=["fuzz-camera"],
            planned_start=_ts(-60), planned_end=_ts(3600), actor=builder),
            timeout=30, metadata=bearer(c.idp.mint(builder, roles=sorted(ROLES))))
        ids.append(d.id)
    media = _media(tmp_path_factory.mktemp("fuzz-media"))
    KNOWN.extend([*ids[:2], "fuzz-camera", "fuzz-gallery", "fuzz-subject", "sface-2021dec", *media])
    TEMPLATE_IDS.update(deployment=ids[2], image=next(m for m in media if m.endswith("tiny.png")))
    IMAGES.extend([tiny_image("JPEG"), tiny_image("PNG"), tiny_image("JPEG", 200), png_bomb(), png_bomb(65_535, 1),
                   jpeg_bomb(), b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a\x01\x00\x01\x00", b"BM",
                   b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"II*\x00"])
    data = data_dir(required=False)
    faces = sorted((data / "lfw-dev" / "AJ_Cook").glob("*.jpg")) if data else []
    FACE.append(faces[0].read_bytes() if faces else tiny_image("JPEG", 200))  # a real face reaches the models
    IMAGES.append(FACE[0])
    if faces:  # an ACTIVE deployment watching for that face: pushed frames go through the whole pipeline
        live = create_deployment(clients, "fuzz-live", ["fuzz-camera"], actor=builder)
        enroll(clients, live.id, {"fuzz-live-1": faces[:1]}, actor=builder, authorise_as="inspector")
        clients.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(deployment_id=live.id, actor="operator"),
                                          timeout=30)
        TEMPLATE_IDS["live"] = live.id
    yield c
    c.close()
    for filled in (KNOWN, IMAGES, FACE):
        filled.clear()


def _short(req) -> str:
    text = repr(req) if not isinstance(req, bytes) else req[:120].hex()
    return text if len(text) < 600 else text[:600] + "..."


def _check(method: ApiMethod, code: str, details: str, what: str) -> None:
    assert code in ALLOWED, f"{method.path} answered {code} ({details!r}) to {what}"
    # a status the client made up: the server's answer was lost (e.g. a refusal echoing a huge id in its trailer)
    assert "Stream removed" not in details and "metadata size" not in details, \
        f"{method.path}: the answer did not arrive ({code}: {details!r}) for {what}"


def _as_caller(msg, subject: str):
    if "actor" in msg.DESCRIPTOR.fields_by_name and msg.actor == SELF:
        msg = type(msg).FromString(msg.SerializeToString())
        msg.actor = subject
    return msg


# ---------------------------------------------------------------------------------------------------------------
# (a) generated messages, every role
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_generated_messages(caller, method):
    examples = EXAMPLES["structured_stream" if method.server_streaming else "structured"]

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(request_strategy(method))
    def fuzz(req):
        subject = caller.subject()
        msgs = req if isinstance(req, list) else [req]
        bodies = [_as_caller(m, subject).SerializeToString() for m in msgs]
        code, details = caller.send("structured", method, bodies if method.client_streaming else bodies[0],
                                    bearer(caller.tokens[subject]))
        _check(method, code, details, _short(req))

    fuzz()


@pytest.mark.parametrize("text", ["\U0001f600" * 1024, "\U000b5a72" * 1024], ids=["emoji", "unprintable"])
def test_huge_strings_in_every_field(caller, text):
    """Every string field 4 KB of 4-byte characters (a refusal that echoes one must still arrive)."""
    for method in METHODS:
        msg = method.request()
        for f in msg.DESCRIPTOR.fields:
            if f.type == FD.TYPE_STRING and f.name != "actor":
                if f.is_repeated:
                    getattr(msg, f.name).append(text)
                else:
                    setattr(msg, f.name, text)
        subject = caller.subject()
        body = msg.SerializeToString()
        code, details = caller.send("huge strings", method, [body] if method.client_streaming else body,
                                    bearer(caller.tokens[subject]))
        _check(method, code, details, "4 KB strings")


# ---------------------------------------------------------------------------------------------------------------
# (b) malformed protobuf
# ---------------------------------------------------------------------------------------------------------------
def _parses(method: ApiMethod, body: bytes) -> bool:
    try:
        method.request.FromString(body)
        return True
    except DecodeError:
        return False


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_malformed_bodies(caller, method):
    @settings(max_examples=EXAMPLES["malformed"], **FUZZ_SETTINGS)
    @given(malformed_strategy(method))
    def fuzz(body):
        subject = caller.subject()
        code, details = caller.send("malformed", method, [body] if method.client_streaming else body,
                                    bearer(caller.tokens[subject]))
        _check(method, code, details, f"bytes {_short(body)}")
        if not _parses(method, body):
            assert code == "INVALID_ARGUMENT", f"{method.path}: a body that does not parse got {code} ({details!r})"

    fuzz()


# ---------------------------------------------------------------------------------------------------------------
# (c) no valid credentials, or the wrong role
# ---------------------------------------------------------------------------------------------------------------
REFUSALS = {"no token": "UNAUTHENTICATED", "garbage token": "UNAUTHENTICATED", "basic scheme": "UNAUTHENTICATED",
            "expired token": "UNAUTHENTICATED", "tampered token": "UNAUTHENTICATED", "no role": "PERMISSION_DENIED",
            "wrong role": "PERMISSION_DENIED", "another actor": "PERMISSION_DENIED"}


def _credentials(caller: Caller, method: ApiMethod, kind: str) -> tuple:
    idp, allowed = caller.idp, POLICY.get(method.path, frozenset())
    if kind == "no token":
        return ()
    if kind == "garbage token":
        return bearer("not.a.jwt")
    if kind == "basic scheme":
        return (("authorization", "Basic YWRtaW46YWRtaW4="),)
    if kind == "expired token":
        return bearer(idp.mint("fuzz-expired", ttl_s=-3600, roles=sorted(ROLES)))
    if kind == "tampered token":  # another token's claims under a signature with every role
        head, _, sig = caller.tokens[SUBJECTS[0]].split(".")
        return bearer(f"{head}.{idp.mint('fuzz-low', roles=['public']).split('.')[1]}.{sig}")
    if kind == "another actor":
        return bearer(idp.mint("fuzz-impostor", roles=sorted(allowed or ROLES)))
    wrong = sorted(set(ROLES) - allowed)
    roles = [wrong[len(method.path) % len(wrong)]] if kind == "wrong role" and wrong else []
    return bearer(idp.mint(f"fuzz-{'-'.join(roles) or 'norole'}", roles=roles))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_refused_callers(caller, method):
    has_actor = "actor" in method.request.DESCRIPTOR.fields_by_name and not method.client_streaming
    kinds = [k for k in REFUSALS if k != "another actor" or has_actor]

    @settings(max_examples=EXAMPLES["refused"], **FUZZ_SETTINGS)
    @given(request_strategy(method))
    def fuzz(req):
        for kind in kinds:
            msgs = [type(m).FromString(m.SerializeToString()) for m in (req if isinstance(req, list) else [req])]
            for m in msgs:
                if "actor" in m.DESCRIPTOR.fields_by_name:
                    m.actor = "someone-else" if kind == "another actor" else ""
            bodies = [m.SerializeToString() for m in msgs]
            code, details = caller.send("refused", method, bodies if method.client_streaming else bodies[0],
                                        _credentials(caller, method, kind))
            assert code == REFUSALS[kind], f"{method.path} with {kind}: {code} ({details!r})"

    fuzz()


# ---------------------------------------------------------------------------------------------------------------
# afterwards
# ---------------------------------------------------------------------------------------------------------------
def test_every_service_survived(system, caller):
    total = sum(n for (part, code), n in STATS.items() if code != "rate limited")
    by_part: dict[str, dict[str, int]] = {}
    for (part, code), n in sorted(STATS.items()):
        by_part.setdefault(part, {})[code] = n
    print(f"\nfuzz: {total} calls; by part and status: {by_part}")
    dead = {s: p.returncode for s, p in system.procs.items() if p.poll() is not None}
    assert not dead, f"service processes exited: {dead}"
    access = system.access()
    health = {s: check_health(system.endpoint(s), access=access, timeout=5.0) for s in SERVICES}
    assert all(v == "SERVING" for v in health.values()), health
    errors = []  # an unexpected exception (in an RPC handler, a pipeline stage, a job, a sweep) is logged as one
    for log in sorted((system.state_dir / "logs").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"level": "error"' in line:
                errors.append(f"{log.stem}: {line[:300]}")
    assert not errors, "errors logged during the fuzz:\n" + "\n".join(errors[:20])
    assert not STATS[("structured", "rate limited")] and not STATS[("malformed", "rate limited")], \
        "the fuzz callers hit the rate limit: the fuzz did not reach the handlers"

"""The console's pages. Each handler: who is asking (session or forwarded token), whether their roles may use
the page (the services' own role table), one or a few gRPC calls as that person, a server-rendered page.
Forms are plain HTML forms with a CSRF token; the control room's alert queue is kept live by Server-Sent Events
(StreamAlerts) and a few lines of the console's own script."""

from __future__ import annotations

import asyncio
import calendar
import io
import json
import secrets
import time
from datetime import UTC, datetime, timedelta

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from lfr.console.auth import Session, csrf_ok, may, roles_for
from lfr.console.backend import ApiError, Calls, api_error
from lfr.pb import audit_pb2, identification_pb2, ingest_pb2, match_pb2, watchlist_pb2
from lfr.runtime import events
from lfr.runtime.security import AuthError

COOKIE = "lfr_console"
SECURE_COOKIE = "__Host-lfr_console"
STATUS = {v: k.removeprefix("DEPLOYMENT_STATUS_").lower() for k, v in watchlist_pb2.DeploymentStatus.items()}
CATEGORIES = [(v, k.removeprefix("CATEGORY_").replace("_", " ").lower())
              for k, v in watchlist_pb2.Category.items() if v]
OUTCOMES = {"confirmed": match_pb2.OUTCOME_CONFIRMED_MATCH, "false": match_pb2.OUTCOME_FALSE_ALERT,
            "not-engaged": match_pb2.OUTCOME_NOT_ENGAGED}
OUTCOME_TEXT = {match_pb2.OUTCOME_CONFIRMED_MATCH: "confirmed match", match_pb2.OUTCOME_FALSE_ALERT: "false alert",
                match_pb2.OUTCOME_NOT_ENGAGED: "not engaged", 0: ""}
# The engagement as forces report it (the CLI's --engagement values).
ENGAGEMENTS = {"none": match_pb2.ENGAGEMENT_NO_ACTION, "words-of-advice": match_pb2.ENGAGEMENT_WORDS_OF_ADVICE,
               "arrest": match_pb2.ENGAGEMENT_ARREST, "other": match_pb2.ENGAGEMENT_OTHER_ACTION}
ENGAGEMENT_TEXT = {match_pb2.ENGAGEMENT_ARREST: "arrest", match_pb2.ENGAGEMENT_OTHER_ACTION: "other action",
                   match_pb2.ENGAGEMENT_WORDS_OF_ADVICE: "words of advice",
                   match_pb2.ENGAGEMENT_NO_ACTION: "no engagement", 0: ""}
SOURCE_STATE = {v: k.removeprefix("SOURCE_STATE_").lower() for k, v in ingest_pb2.SourceState.items()}
JOB_STATE = {v: k.removeprefix("JOB_STATE_").lower() for k, v in identification_pb2.JobState.items()}
STATS_EVERY_S = 2.0
HEARTBEAT_S = 15.0
PROBE_TTL_S = 300


class LoginRequired(Exception):
    pass


# ----------------------------------------------------------------------------------------------- plumbing
def _state(request: Request):
    return request.app.state


def _session(request: Request) -> Session | None:
    st = _state(request)
    s = st.sessions.get(request.cookies.get(SECURE_COOKIE if st.secure_cookie else COOKIE))
    request.state.session = s
    return s


def _new_session(request: Request) -> Session:
    s = _state(request).sessions.new()
    request.state.session = s
    request.state.set_cookie = s.sid
    return s


def person(request: Request) -> tuple[Session, Calls]:
    """The signed-in person and their calls; LoginRequired (dev) or AuthError (proxy) otherwise."""
    st = _state(request)
    s = _session(request)
    if st.proxy is not None:
        token, ident = st.proxy.identify(request.headers)
        if s is None or s.user != ident.subject:
            s = _new_session(request)
        s.user, s.roles, s.token = ident.subject, ident.roles, token
    else:
        if s is None or not s.user:
            raise LoginRequired()
        st.login.refresh(s)
    return s, st.backend.as_person(s.token)


def need(s: Session, service: str, method: str, what: str) -> None:
    """Refuse (403, a clear page) unless the person's roles may call the method (the services' role table)."""
    if not may(s.roles, service, method):
        raise ApiError(403, "Not allowed", f"{what} is not open to your roles "
                       f"({', '.join(sorted(s.roles)) or 'none'}); it needs one of: "
                       f"{', '.join(roles_for(service, method))}.", "PERMISSION_DENIED")


def _with_cookie(request: Request, resp: Response) -> Response:
    sid = getattr(request.state, "set_cookie", None)
    if sid:
        st = _state(request)
        resp.set_cookie(SECURE_COOKIE if st.secure_cookie else COOKIE, sid, httponly=True, samesite="strict",
                        secure=st.secure_cookie, path="/")
    return resp


def render(request: Request, template: str, code: int = 200, **ctx) -> Response:
    st = _state(request)
    s = getattr(request.state, "session", None)
    ctx.update(request=request, me=s, csrf=s.csrf if s else "", flash=s.take_flash() if s else [],
               auth_mode=st.cfg.console_auth, nav=_nav(s), now=time.time())
    resp = st.templates.TemplateResponse(request, template, ctx, status_code=code)
    return _with_cookie(request, resp)


def redirect(request: Request, url: str) -> Response:
    return _with_cookie(request, RedirectResponse(url, status_code=303))


def error_page(request: Request, status: int, title: str, message: str) -> Response:
    try:
        if getattr(request.state, "session", None) is None:
            _session(request)
        return render(request, "error.html", code=status, title=title, message=message)
    except Exception:  # the error page must not fail in turn
        return Response(f"{title}: {message}", status_code=status, media_type="text/plain")


def _nav(s: Session | None) -> list[tuple[str, str]]:
    if s is None or not s.user:
        return []
    items = []
    if may(s.roles, "watchlist", "ListDeployments"):
        items.append(("/deployments", "Deployments"))
    if may(s.roles, "match", "StreamAlerts"):
        items.append(("/control", "Control room"))
    items.append(("/records", "Records"))
    if may(s.roles, "audit", "Query"):
        items.append(("/audit", "Audit"))
    if may(s.roles, "identification", "Identify") or may(s.roles, "identification", "ListJobs"):
        items.append(("/investigations", "Investigations"))
    return items


async def form_of(request: Request) -> dict:
    """The posted form, refused without the session's CSRF token."""
    form = await request.form()
    s = getattr(request.state, "session", None)
    if not csrf_ok(s, form.get("csrf")):
        raise ApiError(403, "Form refused", "This form was sent without a valid security token (CSRF). Reload "
                       "the page and send it again.", "CSRF")
    return form


def _ts_from_date(text: str) -> object | None:
    text = (text or "").strip()
    if not text:
        return None
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            t = datetime.strptime(text, fmt).replace(tzinfo=UTC)
            return events.ts_from_ns(int(t.timestamp() * 1e9))
        except ValueError:
            continue
    raise ApiError(400, "Request refused", f"{text!r} is not a date (YYYY-MM-DD, or YYYY-MM-DDTHH:MM, UTC)")


def _exif_date(data: bytes):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            exif = im.getexif()
            raw = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)
        if raw:
            t = time.strptime(str(raw).strip().rstrip("\x00"), "%Y:%m:%d %H:%M:%S")
            return events.ts_from_ns(calendar.timegm(t) * 10**9)
    except (OSError, ValueError, SyntaxError):
        return None
    return None


def _float(form, key: str, default: float = 0.0) -> float:
    raw = (form.get(key) or "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ApiError(400, "Request refused", f"{key}: {raw!r} is not a number") from None


# ----------------------------------------------------------------------------------------------- sign in
async def home(request: Request) -> Response:
    try:
        s, _ = person(request)
    except LoginRequired:
        return redirect(request, "/login")
    nav = _nav(s)
    return redirect(request, nav[0][0] if nav else "/records")


async def login_page(request: Request) -> Response:
    st = _state(request)
    if st.login is None:
        return redirect(request, "/")
    if _session(request) is None:
        _new_session(request)
    return render(request, "login.html", users=sorted(st.login.users().items()))


async def login_post(request: Request) -> Response:
    st = _state(request)
    if st.login is None:
        return redirect(request, "/")
    s = _session(request)
    form = await form_of(request)
    user = (form.get("user") or "").strip()
    if user not in st.login.users():
        raise AuthError("UNAUTHENTICATED", f"{user!r} is not a development user")
    st.sessions.drop(s.sid)  # a fresh session id (and CSRF token) at sign-in
    s = _new_session(request)
    st.login.login(s, user)
    return redirect(request, "/")


async def logout(request: Request) -> Response:
    s = _session(request)
    await form_of(request)
    _state(request).sessions.drop(s.sid)
    return redirect(request, "/login")


# ----------------------------------------------------------------------------------------------- deployments
async def deployments(request: Request) -> Response:
    s, calls = person(request)
    need(s, "watchlist", "ListDeployments", "The deployments page")
    resp = await calls.unary("watchlist", "ListDeployments", watchlist_pb2.ListDeploymentsRequest(),
                             what="Listing deployments")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    return render(request, "deployments.html", deployments=list(resp.deployments)[::-1], status=STATUS,
                  start_default=now.strftime("%Y-%m-%dT%H:%M"),
                  end_default=(now + timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M"))


async def deployment_create(request: Request) -> Response:
    s, calls = person(request)
    need(s, "watchlist", "CreateDeployment", "Creating a deployment")
    f = await form_of(request)
    cameras = [c.strip() for c in (f.get("cameras") or "").replace("\n", ",").split(",") if c.strip()]
    d = await calls.unary("watchlist", "CreateDeployment", watchlist_pb2.CreateDeploymentRequest(
        name=f.get("name", ""), purpose=f.get("purpose", ""), site=f.get("site", ""),
        legal_basis=f.get("legal_basis", ""), planned_start=_ts_from_date(f.get("planned_start", "")),
        planned_end=_ts_from_date(f.get("planned_end", "")), cameras=cameras,
        threshold=_float(f, "threshold"), actor=s.user, authority=_authority(f.get("authority", "")),
        threshold_reason=f.get("threshold_reason", "")), what="Creating the deployment")
    s.say("ok", f"Deployment {d.name!r} created ({d.id}). Now build its watchlist.")
    return redirect(request, f"/deployments/{d.id}")


def _authority(text: str) -> dict[str, str]:
    """The written authority's fields from "field: text" lines."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise ApiError(400, "Request refused", f"written authority: {line.strip()[:60]!r} is not 'field: text'")
        out[key.strip().lower().replace(" ", "_")] = value.strip()
    return out


async def _deployment(calls: Calls, deployment_id: str):
    return await calls.unary("watchlist", "GetDeployment",
                             watchlist_pb2.GetDeploymentRequest(deployment_id=deployment_id),
                             what=f"Deployment {deployment_id}")


async def deployment_page(request: Request) -> Response:
    s, calls = person(request)
    need(s, "watchlist", "GetDeployment", "A deployment's page")
    d = await _deployment(calls, request.path_params["id"])
    entries = None
    if may(s.roles, "watchlist", "ListEntries"):
        entries = await calls.unary("watchlist", "ListEntries",
                                    watchlist_pb2.ListEntriesRequest(deployment_id=d.id), what="The watchlist")
    return render(request, "deployment.html", d=d, entries=entries, status=STATUS, categories=CATEGORIES,
                  category_name=dict(CATEGORIES))


async def entry_enroll(request: Request) -> Response:
    s, calls = person(request)
    need(s, "watchlist", "EnrollEntry", "Building a watchlist")
    did = request.path_params["id"]
    f = await form_of(request)
    uploads = [u for u in f.getlist("images") if hasattr(u, "read")]
    images = [await u.read() for u in uploads]
    images = [b for b in images if b]
    if not images:
        raise ApiError(400, "Request refused", "Choose at least one image of the person to enroll.")
    stated = _ts_from_date(f.get("captured_at", ""))
    captured = [stated] if stated is not None else [_exif_date(b) for b in images]
    if any(c is None for c in captured):
        captured = []
    try:
        category = int(f.get("category") or 0)
    except ValueError:
        category = 0
    request_fields = {"deployment_id": did, "subject_ref": f.get("subject_ref", ""), "category": category,
                      "source_system": f.get("source_system", ""), "legal_basis": f.get("legal_basis", ""),
                      "captured_at": captured, "under_18": bool(f.get("under_18"))}
    names = [u.filename or f"image {i + 1}" for i, u in enumerate(uploads)]
    return await _enroll(request, s, calls, request_fields, images, names, [])


async def _enroll(request: Request, s: Session, calls: Calls, fields: dict, images: list[bytes], names: list[str],
                  faces: list[int]) -> Response:
    """EnrollEntry, then the result of each image on the deployment page; when an image shows several faces,
    the faces found (cut from the upload, in memory) to choose from, and the upload kept five minutes for that."""
    did = fields["deployment_id"]
    resp = await calls.unary("watchlist", "EnrollEntry", watchlist_pb2.EnrollEntryRequest(
        images=images, face=faces, actor=s.user, **fields), timeout=120, what="Enrolling the entry")
    results = [{"name": names[r.index] if r.index < len(names) else f"image {r.index + 1}", "accepted": r.accepted,
                "reason": r.reason, "q": r.quality, "face": r.face, "face_choice": r.face_choice}
               for r in resp.results]
    choose = []
    for r in resp.results:
        if not r.accepted and len(r.faces) > 1 and r.index < len(images):
            crops = _crops(images[r.index], r.faces)
            for face, crop in crops:
                key = secrets.token_urlsafe(12)
                s.keep_image(f"mem:{key}", crop)
                choose.append({"index": r.index, "name": names[r.index], "n": face.face, "key": key,
                               "q": face.quality})
    pending = ""
    if choose:
        pending = secrets.token_urlsafe(12)
        s.keep_pending(pending, {"fields": fields, "images": images, "names": names})
    if resp.entry_id:
        s.say("ok", f"{resp.subject_ref}: enrolled ({sum(r.accepted for r in resp.results)} of "
              f"{len(resp.results)} images accepted).", results=results)
    else:
        s.say("error", f"{resp.subject_ref or 'The entry'} was refused: {resp.reason}", results=results,
              choose=choose, pending=pending)
    return redirect(request, f"/deployments/{did}")


def _crops(image: bytes, faces) -> list:
    """Each found face cut from the uploaded image (with a margin), as JPEG, for the builder to choose from."""
    from PIL import Image

    out = []
    try:
        with Image.open(io.BytesIO(image)) as im:
            im = im.convert("RGB")
            for face in faces:
                b = face.box
                mx, my = (b.x2 - b.x1) * 0.25, (b.y2 - b.y1) * 0.25
                crop = im.crop((max(0, int(b.x1 - mx)), max(0, int(b.y1 - my)), min(im.width, int(b.x2 + mx)),
                                min(im.height, int(b.y2 + my))))
                crop.thumbnail((160, 160))
                buf = io.BytesIO()
                crop.save(buf, "JPEG", quality=85)
                out.append((face, buf.getvalue()))
    except (OSError, ValueError):
        return []
    return out


async def entry_choose(request: Request) -> Response:
    s, calls = person(request)
    need(s, "watchlist", "EnrollEntry", "Building a watchlist")
    f = await form_of(request)
    pending = s.take_pending(f.get("pending", ""))
    if pending is None or pending["fields"]["deployment_id"] != request.path_params["id"]:
        raise ApiError(410, "Upload no longer held", "The images are kept in memory for five minutes only; "
                       "upload them again.")
    faces = []
    for i in range(len(pending["images"])):
        try:
            faces.append(int(f.get(f"face-{i}") or 0))
        except ValueError:
            faces.append(0)
    return await _enroll(request, s, calls, pending["fields"], pending["images"], pending["names"], faces)


async def entry_remove(request: Request) -> Response:
    s, calls = person(request)
    need(s, "watchlist", "RemoveEntry", "Removing a watchlist entry")
    did = request.path_params["id"]
    f = await form_of(request)
    await calls.unary("watchlist", "RemoveEntry", watchlist_pb2.RemoveEntryRequest(
        deployment_id=did, entry_id=request.path_params["entry"], actor=s.user, reason=f.get("reason", "")),
        what="Removing the entry")
    s.say("ok", "Entry removed; the list needs authorising again.")
    return redirect(request, f"/deployments/{did}")


async def authorise_page(request: Request) -> Response:
    s, calls = person(request)
    need(s, "watchlist", "AuthoriseDeployment", "Authorising a watchlist")
    d = await _deployment(calls, request.path_params["id"])
    entries = await calls.unary("watchlist", "ListEntries", watchlist_pb2.ListEntriesRequest(deployment_id=d.id),
                                what="The watchlist")
    return render(request, "authorise.html", d=d, entries=entries, status=STATUS, category_name=dict(CATEGORIES))


async def authorise_post(request: Request) -> Response:
    s, calls = person(request)
    need(s, "watchlist", "AuthoriseDeployment", "Authorising a watchlist")
    did = request.path_params["id"]
    f = await form_of(request)
    d = await calls.unary("watchlist", "AuthoriseDeployment", watchlist_pb2.AuthoriseRequest(
        deployment_id=did, actor=s.user, watchlist_digest=f.get("watchlist_digest", ""), note=f.get("note", "")),
        what="Authorising the watchlist")
    if d.status == watchlist_pb2.DEPLOYMENT_STATUS_AUTHORISED:
        s.say("ok", f"Watchlist authorised (digest {d.authorised_digest[:16]}).")
    else:
        s.say("ok", f"Your approval is recorded ({len(d.approvals)} of {d.authorisers_required}); a second "
              "authorising officer must approve the same list.")
    return redirect(request, f"/deployments/{did}")


def transition(rpc: str, verb: str):
    async def handler(request: Request) -> Response:
        s, calls = person(request)
        need(s, "watchlist", rpc, f"{verb.capitalize()} a deployment")
        did = request.path_params["id"]
        f = await form_of(request)
        d = await calls.unary("watchlist", rpc, watchlist_pb2.TransitionRequest(
            deployment_id=did, actor=s.user, reason=f.get("reason", "")), what=f"{verb.capitalize()} the deployment")
        s.say("ok", f"Deployment {d.name!r} is now {STATUS[d.status]}.")
        if rpc == "StartDeployment" and may(s.roles, "match", "StreamAlerts"):
            return redirect(request, f"/deployments/{did}/control")
        return redirect(request, f"/deployments/{did}")
    return handler


# ----------------------------------------------------------------------------------------------- control room
async def control_index(request: Request) -> Response:
    s, calls = person(request)
    need(s, "match", "StreamAlerts", "The control room")
    active = []
    if may(s.roles, "watchlist", "ListDeployments"):
        resp = await calls.unary("watchlist", "ListDeployments", watchlist_pb2.ListDeploymentsRequest(),
                                 what="Listing deployments")
        active = [d for d in resp.deployments if d.status == watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE]
    if len(active) == 1:
        return redirect(request, f"/deployments/{active[0].id}/control")
    return render(request, "control_index.html", active=active)


def _alert_row(r: match_pb2.AlertReview | None = None, a: match_pb2.Alert | None = None) -> dict:
    a = a if a is not None else r.alert
    row = {"alert_id": a.alert_id, "revision": a.revision, "subject_ref": a.subject_ref, "score": round(a.score, 3),
           "threshold": round(a.threshold, 3), "camera": a.envelope.camera_id,
           "capture_ms": a.envelope.capture_time.ToMilliseconds(), "raised_ms": a.raised_at.ToMilliseconds(),
           "sightings": a.sightings, "url": f"/alerts/{a.alert_id}"}
    if r is not None:
        row.update(overdue=r.overdue, adjudicated=r.adjudicated,
                   outcome=OUTCOME_TEXT.get(r.adjudication.outcome, "") if r.adjudicated else "")
    return row


async def control_page(request: Request) -> Response:
    s, calls = person(request)
    need(s, "match", "StreamAlerts", "The control room")
    d = await _deployment(calls, request.path_params["id"])
    if d.status != watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE:
        raise ApiError(409, "Not possible now", f"The control room is for an active deployment; {d.name!r} is "
                       f"{STATUS[d.status]}.", "FAILED_PRECONDITION")
    stats, alerts, sources = await asyncio.gather(
        calls.unary("match", "GetStats", match_pb2.GetStatsRequest(deployment_id=d.id), what="Counters"),
        calls.unary("match", "ListAlerts", match_pb2.ListAlertsRequest(deployment_id=d.id), what="Alerts"),
        _sources(calls, s, d.id))
    rows = [_alert_row(r) for r in alerts.alerts][::-1]
    return render(request, "control.html", d=d, stats=stats, alerts=rows, sources=sources, cameras=list(d.cameras),
                  source_state=SOURCE_STATE)


async def _sources(calls: Calls, s: Session, deployment_id: str) -> list:
    if not may(s.roles, "ingest", "ListSources"):
        return []
    resp = await calls.unary("ingest", "ListSources", ingest_pb2.ListSourcesRequest(), what="Camera sources")
    return [x for x in resp.sources if x.deployment_id == deployment_id]


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def control_events(request: Request) -> Response:
    """Server-Sent Events: each alert (and revision) as StreamAlerts delivers it, and the counters, overdue
    flags and camera states every two seconds."""
    s, calls = person(request)
    need(s, "match", "StreamAlerts", "The control room's alert stream")
    did = request.path_params["id"]
    queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
    call = calls.stream("match", "StreamAlerts", match_pb2.StreamAlertsRequest(deployment_id=did, from_start=True))

    st = _state(request)

    async def follow():
        try:
            async for a in call:
                await queue.put(("alert", _alert_row(a=a)))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                await queue.put(("problem", {"message": api_error(exc, "The alert stream").message}))
        await queue.put(("end", {}))  # the stream ended (match restarted, ...): the browser reconnects

    async def tick():
        while True:
            if st.login is not None:  # dev: a fresh token before the last one expires
                st.login.refresh(s)
            now = st.backend.as_person(s.token)
            try:
                stats, flagged, sources = await asyncio.gather(
                    now.unary("match", "GetStats", match_pb2.GetStatsRequest(deployment_id=did)),
                    now.unary("match", "ListAlerts", match_pb2.ListAlertsRequest(deployment_id=did)),
                    _sources(now, s, did))
                await queue.put(("stats", {
                    "faces_seen": stats.faces_seen, "alerts": stats.alerts, "disposed": stats.nonmatches_disposed,
                    "dropped": stats.stale_dropped, "disposal_p50": round(stats.disposal_ms_p50),
                    "disposal_max": round(stats.disposal_ms_max),
                    "pending": sum(not r.adjudicated for r in flagged.alerts),
                    "overdue": [r.alert.alert_id for r in flagged.alerts if r.overdue and not r.adjudicated],
                    "adjudicated": {r.alert.alert_id: OUTCOME_TEXT.get(r.adjudication.outcome, "")
                                    for r in flagged.alerts if r.adjudicated},
                    "sources": {x.source_id: {"state": SOURCE_STATE[x.state], "frames": x.frames_published}
                                for x in sources}}))
            except ApiError as exc:
                if exc.code == "UNAUTHENTICATED":  # the forwarded token expired: reconnect through the proxy
                    await queue.put(("end", {}))
                    return
                await queue.put(("problem", {"message": exc.message}))
            await asyncio.sleep(STATS_EVERY_S)

    async def body():
        tasks = [asyncio.create_task(follow()), asyncio.create_task(tick())]
        try:
            yield b"retry: 2000\n\n"
            while True:
                try:
                    kind, data = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if kind == "end":
                    return  # EventSource reconnects (retry: 2 s) and replays the queue from the start
                yield _sse(kind, data)
        finally:
            call.cancel()
            for t in tasks:
                t.cancel()

    return _with_cookie(request, StreamingResponse(body(), media_type="text/event-stream",
                                                   headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}))


async def source_start(request: Request) -> Response:
    s, calls = person(request)
    need(s, "ingest", "StartSource", "Starting a camera source")
    did = request.path_params["id"]
    f = await form_of(request)
    src = await calls.unary("ingest", "StartSource", ingest_pb2.StartSourceRequest(
        deployment_id=did, camera_id=f.get("camera", ""), url=(f.get("url") or "").strip(),
        target_fps=_float(f, "fps"), realtime=True), what="Starting the source")
    s.say("ok", f"Camera {src.camera_id}: source started ({src.source_id[:8]}).")
    return redirect(request, f"/deployments/{did}/control")


async def source_stop(request: Request) -> Response:
    s, calls = person(request)
    need(s, "ingest", "StopSource", "Stopping a camera source")
    did = request.path_params["id"]
    await form_of(request)
    src = await calls.unary("ingest", "StopSource", ingest_pb2.StopSourceRequest(
        source_id=request.path_params["source"]), what="Stopping the source")
    s.say("ok", f"Camera {src.camera_id}: source {SOURCE_STATE[src.state]}.")
    return redirect(request, f"/deployments/{did}/control")


# ----------------------------------------------------------------------------------------------- alert review
async def _review(s: Session, calls: Calls, alert_id: str) -> match_pb2.AlertReview:
    r = await calls.unary("match", "GetAlert", match_pb2.GetAlertRequest(alert_id=alert_id, actor=s.user),
                          what=f"Alert {alert_id}")
    # Kept for the page's own two image requests only (handed out once): a later request asks the service
    # again, so an image deleted since (retention, the list's purge) is never shown from here.
    for key, data in ((f"probe:{alert_id}", r.alert.probe_jpeg), (f"reference:{alert_id}", r.reference_jpeg)):
        if data:
            s.keep_image(key, data)
        else:
            s.images.pop(key, None)
    return r


async def alert_page(request: Request) -> Response:
    s, calls = person(request)
    need(s, "match", "GetAlert", "Reviewing an alert")
    r = await _review(s, calls, request.path_params["id"])
    a = r.alert
    return render(request, "alert.html", r=r, a=a, outcome_text=OUTCOME_TEXT, engagement_text=ENGAGEMENT_TEXT,
                  margin=a.score - a.threshold, attributes=await _equitability_attributes(calls))


async def _equitability_attributes(calls: Calls) -> dict[str, list[str]]:
    """The optional attributes the policy lets an adjudication record (name -> its values), for the form."""
    policy = await calls.unary("watchlist", "GetPolicy", watchlist_pb2.GetPolicyRequest(), what="The policy")
    return dict((json.loads(policy.json or "{}").get("equitability") or {}).get("attributes") or {})


async def alert_image(request: Request) -> Response:
    s, calls = person(request)
    need(s, "match", "GetAlert", "An alert's images")
    alert_id, which = request.path_params["id"], request.path_params["which"]
    if which not in ("probe", "reference"):
        raise ApiError(404, "Not found", "No such image.")
    data = s.image(f"{which}:{alert_id}", once=True)
    if data is None:
        r = await _review(s, calls, alert_id)
        s.images.pop(f"probe:{alert_id}", None)  # this request asked the service itself: keep nothing
        s.images.pop(f"reference:{alert_id}", None)
        data = r.alert.probe_jpeg if which == "probe" else r.reference_jpeg
        if not data:
            why = ("The probe crop was deleted at the end of its retention period." if which == "probe"
                   else r.reference_status or "The watchlist image is not available.")
            raise ApiError(410, "Image not available", why, "FAILED_PRECONDITION")
    return Response(data, media_type=_media_type(data), headers={"Cache-Control": "no-store, private"})


def _media_type(data: bytes) -> str:
    return "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"


async def adjudicate(request: Request) -> Response:
    s, calls = person(request)
    need(s, "match", "Adjudicate", "Adjudicating an alert")
    alert_id = request.path_params["id"]
    f = await form_of(request)
    outcome = OUTCOMES.get(f.get("outcome", ""))
    if outcome is None:
        raise ApiError(400, "Request refused", "Choose the outcome: confirmed match, false alert or not engaged.")
    engagement = ENGAGEMENTS.get(f.get("engagement", ""), 0)
    minutes = f.get("minutes", "").strip()
    if minutes and not minutes.isdigit():
        raise ApiError(400, "Request refused", "The engagement's duration is a whole number of minutes.")
    attributes = {k.removeprefix("attr-"): v for k, v in f.items() if k.startswith("attr-") and v}
    r = await calls.unary("match", "Adjudicate", match_pb2.AdjudicateRequest(
        alert_id=alert_id, outcome=outcome, engagement=engagement, note=f.get("note", ""), actor=s.user,
        amend=bool(f.get("amend")), engagement_minutes=int(minutes or 0), person_informed=bool(f.get("informed")),
        attributes=attributes), what="Adjudicating the alert")
    s.say("ok", f"Recorded: {OUTCOME_TEXT[r.adjudication.outcome]}"
          + (f", {ENGAGEMENT_TEXT[r.adjudication.engagement]}" if r.adjudication.engagement else "")
          + f" by {r.adjudication.actor}.")
    return redirect(request, f"/alerts/{alert_id}")


# ----------------------------------------------------------------------------------------------- records, audit
async def records(request: Request) -> Response:
    from lfr.cli.report import record_row, totals_row

    s, calls = person(request)
    need(s, "audit", "PublicRecords", "The published records")
    q = request.query_params
    period = audit_pb2.PeriodRequest(from_date=q.get("from", ""), to_date=q.get("to", ""))
    resp = await calls.unary("audit", "PublicRecords", period, what="The published records")
    return render(request, "records.html", rows=[record_row(r) for r in resp.records], totals=totals_row(resp.totals),
                  from_date=period.from_date, to_date=period.to_date)


async def audit_page(request: Request) -> Response:
    s, calls = person(request)
    need(s, "audit", "Query", "The audit record")
    q = request.query_params
    try:
        after, limit = int(q.get("after") or 0), int(q.get("limit") or 100)
    except ValueError:
        raise ApiError(400, "Request refused", "after and limit are whole numbers") from None
    req = audit_pb2.QueryRequest(deployment_id=q.get("deployment", ""), type_prefix=q.get("type", ""),
                                 after_sequence=after, limit=max(1, min(limit, 1000)))
    resp = await calls.unary("audit", "Query", req, what="The audit query")
    verify = None
    if q.get("verify"):
        verify = await calls.unary("audit", "Verify", audit_pb2.VerifyRequest(index_only=q.get("verify") == "index"),
                                   timeout=120, what="Verifying the chain")
    return render(request, "audit.html", records=list(resp.records), q=req, verify=verify)


# ----------------------------------------------------------------------------------------------- investigations
async def investigations(request: Request) -> Response:
    s, calls = person(request)
    if not (may(s.roles, "identification", "Identify") or may(s.roles, "identification", "ListJobs")):
        need(s, "identification", "Identify", "Investigations")
    galleries = await calls.unary("identification", "ListGalleries", identification_pb2.ListGalleriesRequest(),
                                  what="Galleries") if may(s.roles, "identification", "ListGalleries") else None
    jobs = await calls.unary("identification", "ListJobs", identification_pb2.ListJobsRequest(), what="Jobs") \
        if may(s.roles, "identification", "ListJobs") else None
    return render(request, "investigations.html", galleries=list(galleries.galleries) if galleries else [],
                  jobs=list(jobs.jobs)[::-1] if jobs else [], job_state=JOB_STATE, result=None)


def _target(f, req) -> None:
    target = (f.get("target") or "").strip()
    if target.startswith("deployment:"):
        req.deployment_id = target.removeprefix("deployment:").strip()
    elif target.startswith("gallery:"):
        req.gallery = target.removeprefix("gallery:").strip()
    elif (f.get("deployment_id") or "").strip():
        req.deployment_id = f.get("deployment_id").strip()
    else:
        raise ApiError(400, "Request refused", "Choose a gallery, or give a deployment id, to search.")


async def identify(request: Request) -> Response:
    s, calls = person(request)
    need(s, "identification", "Identify", "Operator-initiated identification")
    f = await form_of(request)
    photo_key = (f.get("photo_key") or "").strip()
    if photo_key:  # a face chosen from the previous answer: the photo is still in this session's memory
        image = s.image(f"photo:{photo_key}")
        if image is None:
            raise ApiError(410, "Photo no longer held", "The photo is kept in memory for five minutes only; "
                           "upload it again.")
    else:
        upload = f.get("photo")
        image = await upload.read() if hasattr(upload, "read") else b""
        if not image:
            raise ApiError(400, "Request refused", "Choose the photo to search with.")
        photo_key = secrets.token_urlsafe(12)
        s.keep_image(f"photo:{photo_key}", image)
    req = identification_pb2.IdentifyRequest(image=image, k=int(_float(f, "k", 10)), case_reference=f.get("case_reference", ""),
                                        justification=f.get("justification", ""), actor=s.user,
                                        investigation=bool(f.get("investigation")), face=int(_float(f, "face", 0)))
    _target(f, req)
    resp = await calls.unary("identification", "Identify", req, timeout=60, what="The identification search")
    faces = []
    for face in resp.faces:
        key = secrets.token_urlsafe(12)
        s.keep_image(f"mem:{key}", face.crop_jpeg)
        faces.append({"n": face.face, "key": key, "q": face.quality})
    jobs = await calls.unary("identification", "ListJobs", identification_pb2.ListJobsRequest(), what="Jobs") \
        if may(s.roles, "identification", "ListJobs") else None
    galleries = await calls.unary("identification", "ListGalleries", identification_pb2.ListGalleriesRequest(),
                                  what="Galleries")
    return render(request, "investigations.html", galleries=list(galleries.galleries),
                  jobs=list(jobs.jobs)[::-1] if jobs else [], job_state=JOB_STATE, result=resp, faces=faces,
                  outcome=identification_pb2.IdentifyOutcome.Name(resp.outcome).removeprefix("IDENTIFY_OUTCOME_").lower(),
                  photo_key=photo_key, sent=f, category_name=dict(CATEGORIES))


async def memory_image(request: Request) -> Response:
    s, _ = person(request)
    data = s.image(f"mem:{request.path_params['key']}")
    if data is None:
        raise ApiError(410, "Image not available", "This image was held in memory for a short time only.")
    return Response(data, media_type=_media_type(data), headers={"Cache-Control": "no-store, private"})


async def job_submit(request: Request) -> Response:
    s, calls = person(request)
    need(s, "identification", "SubmitJob", "Retrospective identification")
    f = await form_of(request)
    media = []
    for line in (f.get("media") or "").splitlines():
        line = line.strip()
        if line:
            media.append(identification_pb2.MediaSource(url=line) if "://" in line else identification_pb2.MediaSource(path=line))
    req = identification_pb2.SubmitJobRequest(media=media, case_reference=f.get("case_reference", ""),
                                         justification=f.get("justification", ""), actor=s.user,
                                         k=int(_float(f, "k", 5)), fps=_float(f, "fps"),
                                         investigation=bool(f.get("investigation")))
    _target(f, req)
    job = await calls.unary("identification", "SubmitJob", req, timeout=60, what="Submitting the job")
    s.say("ok", f"Job {job.job_id[:8]} submitted.")
    return redirect(request, f"/jobs/{job.job_id}")


async def _job_results(calls: Calls, job_id: str) -> list:
    call = calls.stream("identification", "StreamResults", identification_pb2.StreamResultsRequest(job_id=job_id), timeout=30)
    try:
        return [r async for r in call]
    except grpc.RpcError as exc:
        raise api_error(exc, "The job's results") from None


async def job_page(request: Request) -> Response:
    s, calls = person(request)
    need(s, "identification", "GetJob", "A retrospective job")
    job = await calls.unary("identification", "GetJob", identification_pb2.GetJobRequest(job_id=request.path_params["id"]),
                            what="The job")
    results = await _job_results(calls, job.job_id) if may(s.roles, "identification", "StreamResults") else []
    return render(request, "job.html", job=job, results=results, job_state=JOB_STATE,
                  running=job.state in (identification_pb2.JOB_STATE_QUEUED, identification_pb2.JOB_STATE_RUNNING))


async def job_progress(request: Request) -> Response:
    s, calls = person(request)
    need(s, "identification", "GetJob", "A retrospective job")
    job = await calls.unary("identification", "GetJob", identification_pb2.GetJobRequest(job_id=request.path_params["id"]),
                            what="The job")
    p = job.progress
    return JSONResponse({"state": JOB_STATE[job.state], "frames_done": p.frames_done,
                         "frames_total": max(p.frames_total, p.frames_done), "items_done": p.items_done,
                         "items_total": p.items_total, "results": p.results, "eta_s": round(p.eta_s, 1)},
                        headers={"Cache-Control": "no-store"})


async def job_cancel(request: Request) -> Response:
    s, calls = person(request)
    need(s, "identification", "CancelJob", "Cancelling a job")
    f = await form_of(request)
    job = await calls.unary("identification", "CancelJob", identification_pb2.CancelJobRequest(
        job_id=request.path_params["id"], actor=s.user, reason=f.get("reason", "")), what="Cancelling the job")
    s.say("ok", f"Job {job.job_id[:8]} is {JOB_STATE[job.state]}.")
    return redirect(request, f"/jobs/{job.job_id}")


async def health(request: Request) -> Response:
    return Response("ok", media_type="text/plain")


def routes() -> list[Route]:
    return [
        Route("/", home), Route("/healthz", health),
        Route("/login", login_page, methods=["GET"]), Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/deployments", deployments, methods=["GET"]),
        Route("/deployments", deployment_create, methods=["POST"]),
        Route("/deployments/{id}", deployment_page),
        Route("/deployments/{id}/entries", entry_enroll, methods=["POST"]),
        Route("/deployments/{id}/entries/choose", entry_choose, methods=["POST"]),
        Route("/deployments/{id}/entries/{entry}/remove", entry_remove, methods=["POST"]),
        Route("/deployments/{id}/authorise", authorise_page, methods=["GET"]),
        Route("/deployments/{id}/authorise", authorise_post, methods=["POST"]),
        Route("/deployments/{id}/start", transition("StartDeployment", "start"), methods=["POST"]),
        Route("/deployments/{id}/end", transition("EndDeployment", "end"), methods=["POST"]),
        Route("/deployments/{id}/cancel", transition("CancelDeployment", "cancel"), methods=["POST"]),
        Route("/control", control_index),
        Route("/deployments/{id}/control", control_page),
        Route("/deployments/{id}/events", control_events),
        Route("/deployments/{id}/sources", source_start, methods=["POST"]),
        Route("/deployments/{id}/sources/{source}/stop", source_stop, methods=["POST"]),
        Route("/alerts/{id}", alert_page),
        Route("/alerts/{id}/{which}.jpg", alert_image),
        Route("/alerts/{id}/adjudicate", adjudicate, methods=["POST"]),
        Route("/records", records), Route("/audit", audit_page),
        Route("/investigations", investigations),
        Route("/investigations/identify", identify, methods=["POST"]),
        Route("/investigations/jobs", job_submit, methods=["POST"]),
        Route("/mem/{key}.jpg", memory_image),
        Route("/jobs/{id}", job_page), Route("/jobs/{id}/progress.json", job_progress),
        Route("/jobs/{id}/cancel", job_cancel, methods=["POST"]),
    ]

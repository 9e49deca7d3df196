"""The console's web application: configuration, sessions, security headers, error pages, and the process
entry point (`python -m lfr.console`). The pages themselves are in views.py."""

from __future__ import annotations

import ipaddress
import time
from collections import defaultdict, deque
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from lfr.console.auth import DevLogin, ProxyTokens, Sessions, may
from lfr.console.backend import ApiError, Backend, Targets, console_access
from lfr.runtime.config import Config
from lfr.runtime.logs import get_logger, setup_logging
from lfr.runtime.security import AuthError

HERE = Path(__file__).resolve().parent
MAX_BODY = 48 << 20  # uploads (watchlist images, a probe photo) are held in memory only
# Uploaded files stay in memory: Starlette spools parts above this size to a temporary file, which would put a
# face image on the console's disk.
MultiPartParser.spool_max_size = MAX_BODY
CSP = ("default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "media-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def _ts(ts) -> str:
    if ts is None or (not ts.seconds and not ts.nanos):
        return ""
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class PageTimes:
    """Server time of each page (route path template), for the Server-Timing header and `lfr bench console`."""

    def __init__(self, keep: int = 512):
        self.ms: dict[str, deque] = defaultdict(lambda: deque(maxlen=keep))

    def add(self, route: str, ms: float) -> None:
        self.ms[route].append(ms)


class Security:
    """Pure ASGI middleware: body size bound, timing, and the headers every response carries."""

    def __init__(self, app, times: PageTimes, crash):
        self.app, self.times, self.crash = app, times, crash

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            resp = PlainTextResponse(f"request too large (at most {MAX_BODY >> 20} MB)", status_code=413)
            return await resp(scope, receive, send)
        t0 = time.perf_counter()

        async def wrapped(message):
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - t0) * 1000
                route = scope.get("route")
                if route is not None:
                    self.times.add(getattr(route, "path", "?"), ms)
                extra = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                         (b"cross-origin-opener-policy", b"same-origin"),
                         (b"server-timing", f"app;dur={ms:.1f}".encode())]
                names = {k.lower() for k, _ in message.get("headers", [])}
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await wrapped(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # a clear page, never a stack trace (and nothing of the request in the log)
            if started:
                raise
            resp = await self.crash(Request(scope, receive), exc)
            await resp(scope, receive, wrapped)


def create_app(cfg: Config) -> Starlette:
    from lfr.console import views

    log = get_logger(component="console")
    access = console_access(cfg)
    login = DevLogin(cfg.state_dir) if cfg.console_auth == "dev" else None
    proxy = ProxyTokens(cfg) if cfg.console_auth == "proxy" else None
    secure = {"on": True, "off": False}.get(cfg.console_secure_cookie, not loopback(cfg.console_host))
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["ts"] = _ts
    templates.env.filters["ms"] = lambda ms: datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")
    templates.env.globals["may"] = may
    times = PageTimes()

    @asynccontextmanager
    async def lifespan(app):
        app.state.backend = Backend(Targets.from_config(cfg), access)
        log.info("console.started", host=cfg.console_host, port=cfg.console_port, auth=cfg.console_auth)
        try:
            yield
        finally:
            await app.state.backend.close()

    async def api_error(request: Request, exc: ApiError):
        return views.error_page(request, exc.status, exc.title, exc.message)

    async def auth_error(request: Request, exc: AuthError):
        status = 401 if exc.code == "UNAUTHENTICATED" else 403
        return views.error_page(request, status, "Not signed in" if status == 401 else "Not allowed", str(exc))

    async def http_error(request: Request, exc: HTTPException):
        titles = {404: "Not found", 405: "Method not allowed", 400: "Bad request"}
        return views.error_page(request, exc.status_code, titles.get(exc.status_code, "Refused"),
                                exc.detail or "")

    async def login_required(request: Request, exc: views.LoginRequired):
        return views.redirect(request, "/login")

    async def crash(request: Request, exc: Exception):
        import traceback

        where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)[-3:]]
        # the type and where, never the message (it may quote a request's content)
        log.error("console.error", path=request.url.path, error=type(exc).__name__, where=where)
        return views.error_page(request, 500, "Something went wrong",
                                "The console could not complete this request. It has been logged (without its "
                                "content); try again, or tell the system's administrators.")

    app = Starlette(
        routes=[*views.routes(), Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")],
        middleware=[Middleware(Security, times=times, crash=crash)],
        exception_handlers={ApiError: api_error, AuthError: auth_error, HTTPException: http_error,
                            views.LoginRequired: login_required},
        lifespan=lifespan,
    )
    app.state.cfg, app.state.templates, app.state.sessions = cfg, templates, Sessions()
    app.state.login, app.state.proxy, app.state.secure_cookie = login, proxy, secure
    app.state.times = times
    return app


def main() -> None:
    import uvicorn

    cfg = Config.from_env(service="console")
    setup_logging("console", cfg.log_level)
    app = create_app(cfg)
    # uvicorn's access log would print every URL (alert ids, search parameters): off; our own log has no content.
    uvicorn.run(app, host=cfg.console_host, port=cfg.console_port, access_log=False, log_level="warning",
                server_header=False, timeout_graceful_shutdown=int(cfg.grace_s))



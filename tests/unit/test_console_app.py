"""The console's own rules, without a running system: sign-in, CSRF, the security headers, refusals by role
(from the services' role table) as clear pages, and production mode's bearer token check. The whole officer
flow against the real services, in Chromium, is tests/e2e/test_console.py."""

from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from lfr.runtime.config import Config
from lfr.runtime.devidp import DevIdP


@pytest.fixture()
def idp(tmp_path):
    return DevIdP(tmp_path / "security" / "idp").ensure()


def client(cfg: Config) -> TestClient:
    from lfr.console.app import create_app

    return TestClient(create_app(cfg), base_url="http://127.0.0.1:8080")


def dev_client(tmp_path) -> TestClient:
    return client(Config(service="console", console_auth="dev", state_dir=str(tmp_path), insecure=True))


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_dev_sign_in_needs_the_csrf_token_and_pages_carry_the_security_headers(tmp_path, idp):
    with dev_client(tmp_path) as c:
        r = c.get("/deployments", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        page = c.get("/login")
        assert page.status_code == 200 and 'id="login-auditor"' in page.text
        h = page.headers
        assert h["content-security-policy"].startswith("default-src 'self'") and "script-src 'self'" in h[
            "content-security-policy"]
        assert h["x-content-type-options"] == "nosniff" and h["cache-control"] == "no-store"
        assert h["x-frame-options"] == "DENY" and re.match(r"app;dur=[\d.]+", h["server-timing"])
        cookie = h["set-cookie"]
        assert cookie.startswith("lfr_console=") and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        assert "Secure" not in cookie  # on loopback only
        refused = c.post("/login", data={"user": "auditor"})
        assert refused.status_code == 403 and "CSRF" in refused.text and "Traceback" not in refused.text
        signed = c.post("/login", data={"user": "auditor", "csrf": csrf_of(page.text)}, follow_redirects=False)
        assert signed.status_code == 303
        assert "lfr_console=" in signed.headers["set-cookie"]  # a new session id at sign-in


def test_a_role_without_the_right_gets_a_clear_page_naming_who_may(tmp_path, idp):
    with dev_client(tmp_path) as c:
        page = c.get("/login")
        c.post("/login", data={"user": "public", "csrf": csrf_of(page.text)})
        for path in ("/deployments", "/audit", "/investigations", "/control", "/alerts/x"):
            r = c.get(path)
            assert r.status_code == 403, path
            assert "Not allowed" in r.text and "Traceback" not in r.text
        r = c.get("/deployments")
        assert "watchlist_manager" in r.text and "public" in r.text
        nav = re.search(r'<nav aria-label="Main">(.*?)</nav>', c.get("/records", follow_redirects=False).text or "",
                        re.S)
        assert nav is None or "Deployments" not in nav.group(1)


def test_unknown_page_and_method(tmp_path, idp):
    with dev_client(tmp_path) as c:
        assert c.get("/nowhere").status_code == 404
        r = c.put("/login")
        assert r.status_code == 405 and "Traceback" not in r.text


def test_production_mode_takes_the_forwarded_token_and_refuses_without_one(tmp_path, idp):
    cfg = Config(service="console", console_auth="proxy", insecure=True, auth_keys_dir=str(idp.keys_dir),
                 console_host="0.0.0.0")
    with client(cfg) as c:
        r = c.get("/deployments")
        assert r.status_code == 401 and "single sign-on" in r.text
        r = c.get("/deployments", headers={"Authorization": "Basic abc"})
        assert r.status_code == 401 and "Bearer" in r.text
        r = c.get("/audit", headers={"Authorization": f"Bearer {idp.mint('investigator')}"})
        assert r.status_code == 403 and "auditor" in r.text
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("__Host-lfr_console=") and "Secure" in cookie  # not on loopback
        other = DevIdP(tmp_path / "other").ensure()  # a token from an IdP the console does not trust
        r = c.get("/audit", headers={"Authorization": f"Bearer {other.mint('auditor')}"})
        assert r.status_code == 401


def test_configuration_is_checked():
    from lfr.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="LFR_CONSOLE_AUTH"):
        Config.from_env({"LFR_CONSOLE_AUTH": "none"})
    with pytest.raises(ConfigError, match="LFR_CONSOLE_SECURE_COOKIE"):
        Config.from_env({"LFR_CONSOLE_SECURE_COOKIE": "maybe"})

"""The operator console in a real Chromium (Debian's `chromium`, driven by Playwright) on the embedded system:
the builder creates a deployment and enrolls two people from ../shared/data, an inspector (and a second officer
where the policy asks) authorises it, the operator starts a file source in the control room and the alert
arrives on the open page without a reload, the engagement officer reviews probe beside reference and
adjudicates, and the records page shows the confirmed alert. Refusals (a role without the right, a form without
its CSRF token, the reference after the purge) are clear pages. axe-core checks every page visited.

Screenshots of each page go to the test's temporary folder (and to $LFR_CONSOLE_SCREENSHOTS when set)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from lfr.runtime.paths import data_dir

CHROMIUM = os.environ.get("LFR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
AXE_VERSION = "4.14.1"
AXE_DIR = Path(__file__).resolve().parents[2] / ".tox" / "axe-core"
VIDEO = "video/stage-audience-360p30.mp4"
PEOPLE = {"lin-manuel-miranda": "faces/misc/lin-manuel-miranda.png", "alex-lacamoire": "faces/misc/alex-lacamoire.png"}


def axe_source() -> str:
    """axe-core from the npm registry (`npm pack`), kept in an ignored folder (.ci/run fetches it too)."""
    js = AXE_DIR / "package" / "axe.min.js"
    if not js.is_file():
        AXE_DIR.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["npm", "pack", f"axe-core@{AXE_VERSION}", "--pack-destination", str(AXE_DIR)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"npm pack axe-core failed: {out.stderr[-500:]}"
        with tarfile.open(AXE_DIR / f"axe-core-{AXE_VERSION}.tgz") as tar:
            tar.extract("package/axe.min.js", AXE_DIR, filter="data")
    return js.read_text()


@pytest.fixture(scope="module")
def data():
    d = data_dir(required=False)
    if d is None:
        pytest.skip("../shared/data is absent")
    return d


@pytest.fixture(scope="module")
def clock_file(tmp_path_factory) -> Path:
    """Seconds added to the services' clock of time rules (LFR_CLOCK_OFFSET_FILE): moves an alert past its due
    time, so the control room marks it overdue."""
    path = tmp_path_factory.mktemp("clock") / "offset"
    path.write_text("0")
    return path


@pytest.fixture(scope="module")
def system(tmp_path_factory, clock_file):
    from lfr.runtime.embedded import EmbeddedSystem

    roots = [tmp_path_factory.getbasetemp(), data_dir(required=False)]  # as tests/e2e/conftest.py's media_env
    env = {"LFR_MEDIA_ROOTS": os.pathsep.join(str(r) for r in roots if r), "LFR_ACCESS_SUMMARY_S": "2",
           "LFR_CLOCK_OFFSET_FILE": str(clock_file), "LFR_ALERT_SWEEP_INTERVAL_S": "1"}
    with EmbeddedSystem(tmp_path_factory.mktemp("state"), env=env) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def tab_to(page, element_id: str, limit: int = 80) -> None:
    """Move the keyboard focus with Tab until it is on the element (a keyboard user's way there)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement && document.activeElement.id") == element_id:
            return
    raise AssertionError(f"#{element_id} cannot be reached with the Tab key")


class Officer:
    """One person's browser context, signed in through the development login page."""

    def __init__(self, browser, base: str, user: str, shots: Path, axe: str, violations: list):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.base, self.user, self.shots, self.axe, self.violations = base.rstrip("/"), user, shots, axe, violations
        self.page.goto(self.base + "/login")
        self.check("login")
        self.page.click(f"#login-{user}")
        assert self.page.locator("#me").inner_text() == user

    def go(self, path: str):
        return self.page.goto(self.base + path)

    def check(self, name: str) -> None:
        """A screenshot, and axe-core's serious and critical violations of this page (injected through the
        DevTools protocol: the page's own CSP, default-src 'self', stays in force)."""
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)
        self.page.evaluate(self.axe)
        result = self.page.evaluate("axe.run(document, {resultTypes: ['violations']})")
        for v in result["violations"]:
            if v["impact"] in ("serious", "critical"):
                self.violations.append(f"{name}: {v['id']} ({v['impact']}): {v['help']} — "
                                       f"{[n['target'] for n in v['nodes']][:3]}")

    def close(self) -> None:
        self.context.close()


def test_console_end_to_end(system, browser, data, clock_file, tmp_path):
    base = system.console_url()
    assert base, "the embedded system started no console"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    axe, violations = axe_source(), []
    people = {}

    def officer(user: str) -> Officer:
        people[user] = Officer(browser, base, user, shots, axe, violations)
        return people[user]

    try:
        # The builder creates a deployment and enrolls two people (one image each, capture date stated).
        b = officer("builder")
        b.go("/deployments")
        b.check("deployments")
        b.page.fill("#name", "Console test")
        b.page.fill("#site", "demo site")
        b.page.fill("#purpose", "browser test")
        b.page.fill("#legal_basis", "test of the console on public data")
        b.page.click("button:has-text('Create')")
        b.page.wait_for_selector("#enroll-submit")
        deployment_url = b.page.url
        did = deployment_url.rstrip("/").rsplit("/", 1)[1]
        for ref, rel in PEOPLE.items():
            b.page.fill("#subject_ref", ref)
            b.page.fill("#e_legal_basis", "custody image, public test data")
            b.page.fill("#captured_at", time.strftime("%Y-%m-%d", time.gmtime()))
            b.page.set_input_files("#images", str(data / rel))
            b.page.click("#enroll-submit")
            msg = b.page.locator(".msg").first.inner_text()
            assert "enrolled" in msg and "accepted" in msg, msg
        # an image with two faces: the entry is refused, with the reason shown beside the image
        b.page.fill("#subject_ref", "two-people")
        b.page.fill("#e_legal_basis", "custody image, public test data")
        b.page.fill("#captured_at", time.strftime("%Y-%m-%d", time.gmtime()))
        b.page.set_input_files("#images", str(data / "faces/misc/two_people.jpg"))
        b.page.click("#enroll-submit")
        refused = b.page.locator(".msg.error").first.inner_text()
        assert "refused" in refused and "two_people.jpg" in refused, refused
        b.check("deployment-refused-image")
        # ... the builder picks one of the faces shown (cut from the upload) and it is enrolled; then removed
        b.page.check("#face-0-1")
        b.page.click("#choose-face-submit")
        chosen = b.page.locator(".msg").first.inner_text()
        assert "two-people: enrolled" in chosen and "face 1" in chosen, chosen
        assert b.page.locator("#entries tbody tr").count() == 3
        b.page.click("button[aria-label='Remove two-people']")
        assert b.page.locator("#entries tbody tr").count() == 2
        b.check("deployment-enrolled")
        # ... and may not authorise it: a clear refusal page, not a stack trace.
        resp = b.go(f"/deployments/{did}/authorise")
        assert resp.status == 403
        assert "Not allowed" in b.page.locator("h1").inner_text()
        assert "authorising_officer" in b.page.locator("#refusal").inner_text()
        b.check("refused-role")

        # The inspector reviews the exact list and approves it (and a second officer where the policy asks).
        i = officer("inspector")
        i.go(f"/deployments/{did}/authorise")
        facts = i.page.locator("#authorisation").inner_text()
        assert len(i.page.locator("#digest").inner_text()) == 64 and "Threshold" in facts and "Model" in facts
        assert "Authorisers required" in facts
        i.check("authorise")
        required = int(i.page.locator("#required").inner_text().split(":")[0].split()[0])
        i.page.click("#authorise")
        if required > 1:
            s2 = officer("superintendent")
            s2.go(f"/deployments/{did}/authorise")
            s2.page.click("#authorise")
            i.go(f"/deployments/{did}")
        assert i.page.locator("#status").inner_text() == "authorised"

        # The operator starts it, opens the control room and starts the camera's file source.
        o = officer("operator")
        o.go(f"/deployments/{did}")
        o.page.click("#start")
        o.page.wait_for_selector("#queue")
        # a source the ingest service refuses (outside its media roots): its status and message, no trace
        o.page.fill("#url", "/etc/passwd")
        with o.page.expect_navigation() as nav:
            o.page.click("#start-source-button")
        assert nav.value.status in (400, 403), nav.value.status
        refusal = o.page.locator("#refusal").inner_text()
        assert refusal.startswith("Starting the source:") and "Traceback" not in o.page.content(), refusal
        o.check("refused-source")
        o.go(f"/deployments/{did}/control")
        o.page.fill("#url", str(data / VIDEO))
        o.page.fill("#fps", "10")
        o.page.click("#start-source-button")
        o.page.wait_for_selector("#queue[data-live='1']")
        o.page.evaluate("window.__sameDocument = true")  # gone if the page were reloaded
        t_open = time.time()
        row = o.page.wait_for_selector("#queue-body tr[data-alert]", timeout=60_000)
        assert o.page.evaluate("window.__sameDocument === true"), "the page reloaded"
        shown_ms, capture_ms = (int(row.get_attribute("data-shown-ms")), int(row.get_attribute("data-first-capture-ms")))
        assert o.page.locator("#cue").is_visible() and "New alert" in o.page.locator("#cue").inner_text()
        subject = row.query_selector("td:nth-child(2)").inner_text()
        assert subject in PEOPLE
        print(f"alert {subject}: on the page {shown_ms - capture_ms} ms after its frame's capture "
              f"({time.time() - t_open:.1f} s after the source started)")
        o.check("control-room")
        # Left undecided past its due time (the clock of the time rules moved 20 minutes on), it is marked
        # overdue on the open page, still without a reload.
        clock_file.write_text("1200")
        o.page.wait_for_selector(f"#alert-{row.get_attribute('data-alert')}.overdue", timeout=20_000)
        assert "OVERDUE" in o.page.locator(f"#alert-{row.get_attribute('data-alert')} td.state").inner_text()
        assert o.page.evaluate("window.__sameDocument === true"), "the page reloaded"
        o.check("control-room-overdue")

        # The engagement officer (the operator holds both roles) reviews: probe beside reference, decoded.
        row.query_selector("a").click()
        o.page.wait_for_selector("#adjudicate")
        o.page.wait_for_function("() => document.getElementById('probe').complete")
        assert o.page.evaluate("document.getElementById('probe').naturalWidth") > 0
        assert o.page.locator("#reference").count() == 1, o.page.locator("#reference-missing").inner_text()
        o.page.wait_for_function("() => document.getElementById('reference').complete")
        assert o.page.evaluate("document.getElementById('reference').naturalWidth") > 0
        assert "against threshold" in o.page.locator("#score").inner_text()
        o.check("alert-review")
        alert_url = o.page.url
        # A form whose CSRF token was removed is refused.
        o.page.evaluate("document.querySelector('#adjudicate input[name=csrf]').remove()")
        o.page.check("#o-confirmed")
        o.page.click("#adjudicate-submit")
        assert "Form refused" in o.page.locator("h1").inner_text()
        assert "CSRF" in o.page.locator("#refusal").inner_text()
        o.check("refused-csrf")
        o.page.goto(alert_url)
        o.page.check("#o-false")
        o.page.select_option("#engagement", "none")
        o.page.fill("#minutes", "3")
        o.page.check("#informed")  # a false alert: the person was told (#16's engagements)
        o.page.select_option("#attr-perceived_sex", "male")  # an equitability attribute the policy names
        o.page.click("#adjudicate-submit")
        decision = o.page.locator("#decision").inner_text()
        assert "false alert, no engagement (3 min), the person was told" in decision, decision
        assert "perceived sex: male" in decision, decision
        # Amended, by keyboard only: Tab to each control, Space on the radio button, type-ahead in the list,
        # Enter on the button.
        tab_to(o.page, "o-confirmed")
        o.page.keyboard.press("Space")
        tab_to(o.page, "engagement")
        o.page.keyboard.type("arrest")
        tab_to(o.page, "note")
        o.page.keyboard.type("stopped and spoken to")
        tab_to(o.page, "adjudicate-submit")
        with o.page.expect_navigation():
            o.page.keyboard.press("Enter")
        decision = o.page.locator("#decision").inner_text()
        assert "confirmed match, arrest" in decision and "decided by operator" in decision, decision
        assert "amended 1 times" in decision, decision
        o.check("alert-decided")
        img = o.page.request.get(alert_url + "/probe.jpg")
        assert img.ok and img.headers["cache-control"].startswith("no-store"), img.headers
        assert img.headers["content-type"] in ("image/jpeg", "image/png")

        # The records page shows the confirmed alert (the audit records the decision from the event stream).
        a = officer("auditor")
        deadline = time.time() + 20
        while True:
            a.go("/records")
            cell = a.page.locator(f"#records tr[data-deployment='{did}'] td.confirmed")
            if cell.count() and cell.inner_text() == "1":
                break
            assert time.time() < deadline, "the records page never showed the confirmed alert"
            time.sleep(1)
        a.check("records")
        a.go(f"/audit?deployment={did}&verify=index")
        assert "Chain intact" in a.page.locator("#verify-result").inner_text()
        a.check("audit")

        # The investigator identifies from a photo (case reference and justification) against the deployment's
        # watchlist, and runs a retrospective job over the video: progress bar, results by appearance.
        inv = officer("investigator")
        inv.go("/investigations")
        inv.page.set_input_files("#photo", str(data / PEOPLE["alex-lacamoire"]))
        inv.page.select_option("#id-target", "")
        inv.page.fill("#id-deployment", did)
        inv.page.fill("#case_reference", "CASE-13")
        inv.page.fill("#justification", "console test")
        inv.page.click("#identify-submit")
        first = inv.page.locator("#candidates tbody tr").first.inner_text()
        assert "alex-lacamoire" in first, first
        inv.check("investigations-identify")
        inv.page.fill("#media", str(data / VIDEO))
        inv.page.select_option("#job-target", "")
        inv.page.fill("#job-deployment", did)
        inv.page.fill("#job-case", "CASE-13")
        inv.page.fill("#job-just", "console test")
        inv.page.click("#submit-job-button")
        inv.page.wait_for_selector("#job-progress")
        inv.page.wait_for_function("() => document.getElementById('job-state').textContent.startsWith('succeeded')",
                                   timeout=120_000)  # the page updates itself, then reloads for the results
        inv.page.wait_for_selector("#job-results tbody tr td:has-text('lin-manuel-miranda')", timeout=10_000)
        inv.check("job")

        # After the deployment ends (its list is purged at once by default) the reference image is refused.
        o.go(f"/deployments/{did}")
        o.page.click("#end")
        o.go(alert_url.removeprefix(base.rstrip("/")))
        assert o.page.locator("#reference").count() == 0
        missing = o.page.locator("#reference-missing").inner_text()
        assert "purged" in missing, missing
        resp = o.go(alert_url.removeprefix(base.rstrip("/")) + "/reference.jpg")
        assert resp.status == 410 and "purged" in o.page.locator("#refusal").inner_text()
        o.check("refused-reference-after-purge")

        # nothing biometric or secret in the console's log
        log = (system.state_dir / "logs" / "console.log").read_bytes()
        assert b"\xff\xd8\xff" not in log and b"\x89PNG" not in log and b"eyJ" not in log
    finally:
        for p in people.values():
            p.close()
        keep = os.environ.get("LFR_CONSOLE_SCREENSHOTS")
        if keep:
            shutil.copytree(shots, keep, dirs_exist_ok=True)
    assert not violations, "axe-core: serious or critical violations:\n" + "\n".join(violations)


def test_console_behind_single_sign_on_acts_as_the_officer(system, clients):
    """Production mode: the SSO proxy forwards the officer's token; the console checks it and calls the services
    with it, so the audit names the officer. Without a token, or with a bad one, a clear 401 page."""
    import httpx

    from lfr.pb import audit_pb2
    from lfr.runtime.devidp import find_dev_idp
    from lfr.runtime.natsserver import free_port

    port = free_port(system.host)
    env = system.console_env() | {"LFR_CONSOLE_AUTH": "proxy", "LFR_CONSOLE_PORT": str(port),
                                  "LFR_CONSOLE_SECURE_COOKIE": "on"}
    env.pop("LFR_STATE_DIR")  # no development identity provider: tokens come from the proxy only
    proc = subprocess.Popen([sys.executable, "-m", "lfr.console"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    base = f"http://{system.host}:{port}"
    idp = find_dev_idp(system.state_dir)
    try:
        http = httpx.Client(base_url=base, timeout=30)
        deadline = time.time() + 30
        while True:
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "the console did not start"
            time.sleep(0.2)
        r = http.get("/audit")
        assert r.status_code == 401 and "single sign-on" in r.text and "Traceback" not in r.text
        r = http.get("/audit", headers={"Authorization": "Bearer not-a-jwt"})
        assert r.status_code == 401 and "malformed bearer token" in r.text
        r = http.get("/deployments", headers={"Authorization": f"Bearer {idp.mint('public')}"})
        assert r.status_code == 403 and "Not allowed" in r.text
        token = idp.mint("auditor")
        r = http.get("/audit", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "Audit record" in r.text
        assert r.headers["content-security-policy"].startswith("default-src 'self'")
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("__Host-lfr_console=") and "HttpOnly" in cookie and "Secure" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        # a form posted without its CSRF token is refused (the proxy's token alone is not enough)
        r = http.post("/deployments", data={"name": "x"}, headers={"Authorization": f"Bearer {idp.mint('builder')}"})
        assert r.status_code == 403 and "CSRF" in r.text
        # the audit names the officer (their token reached the audit service), not the console
        deadline = time.time() + 20
        while True:
            recs = clients.audit.Query(audit_pb2.QueryRequest(type_prefix="access.audit", limit=1000),
                                       timeout=30).records
            if any(x.actor == "auditor" and "Query" in x.type + x.summary_json for x in recs):
                break
            assert time.time() < deadline, [(x.type, x.actor) for x in recs][-10:]
            time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(20)

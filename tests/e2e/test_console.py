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
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


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


def test_console_end_to_end(system, browser, data, tmp_path):
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

        # The engagement officer (the operator holds both roles) reviews: probe beside reference, decoded.
        row.query_selector("a").click()
        o.page.wait_for_selector("#adjudicate")
        o.page.wait_for_function("document.getElementById('probe').complete")
        assert o.page.evaluate("document.getElementById('probe').naturalWidth") > 0
        assert o.page.locator("#reference").count() == 1, o.page.locator("#reference-missing").inner_text()
        o.page.wait_for_function("document.getElementById('reference').complete")
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
        o.page.check("#o-confirmed")
        o.page.select_option("#engagement", "arrest")
        o.page.fill("#note", "stopped and spoken to")
        o.page.click("#adjudicate-submit")
        decision = o.page.locator("#decision").inner_text()
        assert "confirmed match" in decision and "decided by operator" in decision, decision
        o.check("alert-decided")

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

        inv = officer("investigator")
        inv.go("/investigations")
        inv.check("investigations")
    finally:
        for p in people.values():
            p.close()
        keep = os.environ.get("LFR_CONSOLE_SCREENSHOTS")
        if keep:
            shutil.copytree(shots, keep, dirs_exist_ok=True)
    assert not violations, "axe-core: serious or critical violations:\n" + "\n".join(violations)

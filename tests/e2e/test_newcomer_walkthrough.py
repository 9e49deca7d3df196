"""The deployment walkthrough is docs/walkthrough.sh, shown verbatim in docs/deployments-and-governance.md (linked
from the README) and run here exactly as written on the embedded system: start it and wait for it properly, create
a deployment, build the list, the separation-of-duties refusal, authorise, start, stream a camera, watch an alert
arrive, review and adjudicate it, end the deployment (purged), print the published records; the system it started
is stopped at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "walkthrough.sh"


def test_the_docs_show_the_walkthrough_script_verbatim():
    script = SCRIPT.read_text()
    page = (ROOT / "docs" / "deployments-and-governance.md").read_text()
    assert f"```sh\n{script}```\n" in page, \
        "docs/deployments-and-governance.md must include docs/walkthrough.sh verbatim in a sh block"
    assert "(docs/deployments-and-governance.md)" in (ROOT / "README.md").read_text()


def json_objects(text: str) -> list:
    """The JSON documents printed by the script's commands (pretty-printed objects and one-line ones)."""
    out, dec, i = [], json.JSONDecoder(), 0
    while (i := text.find("{", i)) >= 0:
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        out.append(obj)
        i = end
    return out


def pid_alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_walkthrough_runs_as_written(data, tmp_path):
    env = dict(os.environ, WALKTHROUGH_DIR=str(tmp_path), LFR_DATA_DIR=str(data),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("LFR_STATE_DIR", None)
    env.pop("LFR_ACTOR", None)
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script's trap stops the system it started
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"the walkthrough did not finish:\n{out[-3000:]}\n{err[-3000:]}") from None
    log = (tmp_path / "lfr-up.log").read_text() if (tmp_path / "lfr-up.log").exists() else ""
    assert proc.returncode == 0, f"{out[-4000:]}\n--- stderr\n{err[-4000:]}\n--- lfr up\n{log[-2000:]}"

    assert "ready, every service SERVING" in out
    # the builder's own authorisation is refused for separation of duties (not for a missing role)
    assert "PERMISSION_DENIED: sergeant built the watchlist" in err, err
    assert "AUTHORISED by inspector" in out
    assert "image too old" in out  # a refused image says why
    # the alert arrived on the watch, was reviewed (both images written) and adjudicated
    assert "ALERT" in out and "subject lin-manuel-miranda" in out, out
    assert "lfr: watched for 30 s" in err  # the watch ended by itself (--seconds), exit status 0
    assert (tmp_path / "probe.jpg").stat().st_size > 0 and (tmp_path / "reference.jpg").stat().st_size > 0
    docs = json_objects(out)
    decided = [d for d in docs if d.get("adjudication", {}).get("outcome") == "confirmed_match"]
    assert decided and decided[0]["subject_ref"] == "lin-manuel-miranda", docs
    assert "now PURGED" in out
    record = next(d for d in docs if "confirmed_alerts" in d and "deployment_id" in d)
    assert record["confirmed_alerts"] == 1 and record["alerts"] >= 1 and record["status"] == "ended"
    page = (tmp_path / "deployments.html").read_text()
    assert record["deployment_id"] in page and "Live facial recognition deployments" in page
    totals = next(d for d in docs if "deployments" in d and "from" in d)
    assert totals["deployments"] == 1 and totals["confirmed_alerts"] == 1
    assert "audit chain intact" in out
    # the system the walkthrough started is stopped: no process it ran is left
    endpoints = json.loads((tmp_path / "state" / "endpoints.json").read_text())
    pids = [p["pid"] for p in endpoints.get("supervisor", {}).get("processes", {}).values() if p.get("pid")]
    assert pids and not [p for p in pids if pid_alive(p)]

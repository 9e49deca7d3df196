"""`lfr demo`: the embedded system, a watchlist enrolled from stills, a real video, alerts as they happen."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from lfr.cli.client import Clients, subject_images
from lfr.cli.live import AlertCollector, create_deployment, enroll, stream_video
from lfr.pb import match_pb2, watchlist_pb2
from lfr.runtime.embedded import EmbeddedSystem
from lfr.runtime.paths import data_dir

# People who appear in the default video (stage-audience: a performer and his music director), and two
# who do not: their alerts are the check that strangers stay unmatched. (faces/misc/obama.jpg and biden.jpg
# carry EXIF capture dates from 2012 and 2010, older than the default policy allows: these photos of them do not.)
DEFAULT_WATCHLIST = {
    "lin-manuel-miranda": "faces/misc/lin-manuel-miranda.png",
    "alex-lacamoire": "faces/misc/alex-lacamoire.png",
    "barack-obama": "faces/misc/obama-1080p.jpg",
    "joe-biden": "faces/knn_examples/train/biden/biden2.jpg",
}
DEFAULT_VIDEO = "video/stage-audience-360p30.mp4"


def default_inputs(video: str, watchlist: str) -> tuple[str, dict[str, list[Path]]]:
    if video and watchlist:
        return video, subject_images(watchlist)
    data = data_dir(required=False)
    if data is None:
        raise SystemExit("lfr demo: the shared data folder (../shared/data) is absent; "
                         "pass --video FILE and --watchlist DIR, or set LFR_DATA_DIR")
    subjects = subject_images(watchlist) if watchlist else {k: [data / v] for k, v in DEFAULT_WATCHLIST.items()}
    return video or str(data / DEFAULT_VIDEO), subjects


@contextmanager
def temporary_state(prefix: str, keep: str = "", say=None) -> Iterator[str]:
    """The state folder of one run (`lfr demo`, `lfr bench pipeline`): `keep`, a folder the user named, is used
    and left in place; otherwise a new temporary folder that is deleted when the run ends — normally, by an
    error, by Ctrl-C (SIGINT) or by SIGTERM/SIGHUP — since it holds alert crops, enrollment images and the
    development CA's keys. A signal becomes an exception in the main thread, so the embedded system inside is
    stopped first (its own context exit), then the folder goes; further signals during that cleanup are
    ignored so it is not cut short. `say` (a print-like callable) reports the interruption."""
    if keep:
        yield keep
        return
    path = tempfile.mkdtemp(prefix=prefix)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}

    def interrupted(signum, _frame) -> None:
        for sig in handled:  # one interruption is enough: let the cleanup finish
            signal.signal(sig, signal.SIG_IGN)
        if say:
            say(f"interrupted ({signal.Signals(signum).name}): stopping the system and removing {path}")
        raise KeyboardInterrupt

    if main_thread:
        previous = {sig: signal.signal(sig, interrupted) for sig in handled}
    try:
        yield path
    finally:
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def close_deployment(c: Clients, deployment_id: str, actor: str = "operator", reason: str = "") -> None:
    """End an ACTIVE deployment, cancel a DRAFT or AUTHORISED one: either way its watchlist is purged."""
    d = c.watchlist.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=deployment_id), timeout=30)
    rpc = {watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE: c.watchlist.EndDeployment,
           watchlist_pb2.DEPLOYMENT_STATUS_DRAFT: c.watchlist.CancelDeployment,
           watchlist_pb2.DEPLOYMENT_STATUS_AUTHORISED: c.watchlist.CancelDeployment}.get(d.status)
    if rpc is not None:
        rpc(watchlist_pb2.TransitionRequest(deployment_id=deployment_id, actor=actor, reason=reason), timeout=60)


@contextmanager
def closed_on_failure(c: Clients, deployment_id: str, actor: str = "operator") -> Iterator[None]:
    """A run's deployment is ended (or cancelled) and so purged if the run stops early: an error, Ctrl-C."""
    try:
        yield
    except BaseException:
        try:
            close_deployment(c, deployment_id, actor, reason="the run was interrupted")
        except grpc.RpcError:
            pass  # the system itself is gone: nothing left to end
        raise


def run_demo(state_dir: str = "", video: str = "", watchlist: str = "", fps: float = 10.0) -> int:
    """The demo in `state_dir`, or (by default) in a temporary folder removed at the end. Returns the exit
    status: 0, 1 when the system stopped under it, 130 when interrupted."""
    video, subjects = default_inputs(video, watchlist)
    try:
        with temporary_state("lfr-demo-", keep=state_dir, say=lambda m: print(f"[demo] {m}", flush=True)) as state:
            status = _demo(state, video, subjects, fps)
        if not state_dir:
            print(f"[demo] temporary state folder {state} removed (alert crops, enrollment images, "
                  "development keys)", flush=True)
        return status
    except KeyboardInterrupt:
        print("[demo] interrupted; everything stopped" + ("" if state_dir else ", temporary state removed"),
              flush=True)
        return 130
    except grpc.RpcError as exc:  # the system went away under the demo (a service stopped, the machine is short)
        from lfr.cli.ops import rpc_error_text

        print(f"[demo] stopped: {rpc_error_text(exc)}", file=sys.stderr, flush=True)
        return 1


def _demo(state_dir: str, video: str, subjects: dict[str, list[Path]], fps: float) -> int:
    t0 = time.monotonic()
    print(f"[demo] starting the embedded system (nats-server, Qdrant local, six services) in {state_dir}", flush=True)
    with EmbeddedSystem(state_dir, media_roots=[Path(video).resolve().parent]) as system:
        print(f"[demo] all services SERVING after {time.monotonic() - t0:.1f} s", flush=True)
        if system.console_url():
            print(f"[demo] operator console: {system.console_url()} (sign in as operator to watch the control "
                  "room)", flush=True)
        c = Clients.connect(system.endpoints(), access=system.access(user="operator", follow_actor=True))
        d = create_deployment(c, "demo deployment", ["camera-1"])
        with closed_on_failure(c, d.id):  # an error or Ctrl-C still ends (and purges) the deployment
            print(f"[demo] deployment {d.id}: model {d.model_id} {d.model_version}, threshold {d.threshold:.3f}")
            for ref, resp in enroll(c, d.id, subjects).items():
                ok = sum(r.accepted for r in resp.results)
                reasons = "; ".join(r.reason for r in resp.results if not r.accepted)
                print(f"[demo] enrolled {ref}: {ok}/{len(resp.results)} images accepted" + (f" ({reasons})" if reasons else ""))
            d = c.watchlist.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=d.id))
            print(f"[demo] watchlist of {d.watchlist_size} authorised by "
                  f"{', '.join(a.actor for a in d.approvals)} (digest {d.authorised_digest[:12]}, policy "
                  f"{d.policy_version})" + (f"; second authoriser: {'; '.join(d.second_authoriser_reasons)}"
                                            if d.authorisers_required > 1 else ""))
            c.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="operator"))

            def show(alert: match_pb2.Alert) -> None:
                # capture of this revision's probe -> its publication (raised, or updated with a better probe)
                sent = alert.updated_at if alert.revision else alert.raised_at
                latency = (sent.ToNanoseconds() - alert.envelope.capture_time.ToNanoseconds()) / 1e6
                kind = "[alert] " if alert.revision == 0 else f"[update {alert.revision}]"  # same pass, better probe
                print(f"{kind} {alert.subject_ref:<20} score {alert.score:.3f} (threshold {alert.threshold:.3f}) "
                      f"at video {alert.video_time_s:5.2f} s, camera {alert.envelope.camera_id}, "
                      f"{latency:.0f} ms after capture", flush=True)

            collector = AlertCollector(c, d.id, on_alert=show)
            print(f"[demo] streaming {video} at {fps:g} fps (real time)", flush=True)
            src = stream_video(c, d.id, "camera-1", video, fps)
            time.sleep(2.0)
            collector.close()
            stats = c.match.GetStats(match_pb2.GetStatsRequest(deployment_id=d.id))
            d = c.watchlist.EndDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="operator"))
            by_subject: dict[str, int] = {}
            for a, _ in collector.alerts:
                if a.revision == 0:  # one alert per person per pass; revisions update it
                    by_subject[a.subject_ref] = by_subject.get(a.subject_ref, 0) + 1
            print(f"[demo] summary: {src.frames_published} frames, {stats.faces_seen} faces seen, "
                  f"{stats.alerts} alerts {by_subject or ''}, {stats.nonmatches_disposed} non-matches disposed "
                  f"(max {stats.disposal_ms_max:.0f} ms after capture, p50 {stats.disposal_ms_p50:.0f} ms)")
            status = watchlist_pb2.DeploymentStatus.Name(d.status).removeprefix("DEPLOYMENT_STATUS_")
            if d.status == watchlist_pb2.DEPLOYMENT_STATUS_PURGED:
                print(f"[demo] deployment {status}: watchlist vectors and images deleted, "
                      f"{d.watchlist_size} nominal ids kept for the record")
            else:
                print(f"[demo] deployment {status}: watchlist purge due at {d.purge_due.ToJsonString()}")
        c.close()
    return 0


def main() -> None:  # pragma: no cover - `lfr demo` is the entry point
    sys.exit(run_demo())

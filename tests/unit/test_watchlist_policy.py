"""Deployment governance in the pure cores: the policy file, every lifecycle transition and refusal, the
authorisation of an exact composition, the sweeper's decisions, and the one liveness rule."""

from __future__ import annotations

import json

import pytest

from lfr.errors import Refused
from lfr.pb import watchlist_pb2 as pb
from lfr.policy import CATEGORY_NAMES, PolicyError, parse_policy
from lfr.runtime.config import Config, ConfigError
from lfr.runtime.deployments import live_refusal
from lfr.runtime.events import ts_from_ns
from lfr.watchlist.core import (
    ACTIVE,
    AUTHORISED,
    CANCELLED,
    DRAFT,
    ENDED,
    PURGED,
    DeploymentRecord,
    EntryRecord,
    ImageRecord,
    composition_digest,
    validate_governance,
    watchlist_violations,
)
from lfr.watchlist.service import load_policy

S = 1_000_000_000
DAY = 86_400 * S
NOW = 1_750_000_000 * S
GOOD_Q = {"inter_eye_px": 60.0, "sharpness": 300.0, "yaw_deg": 5.0, "pitch_deg": 2.0, "roll_deg": 1.0,
          "detector_score": 0.9}


def policy_dict(**overrides) -> dict:
    p = {
        "version": "test-1",
        "categories": ["wanted-by-court", "wanted-by-police", "missing-vulnerable"],
        "max_watchlist_size": 2,
        "enrollment": {"min_inter_eye_px": 30, "min_sharpness": 50, "max_abs_yaw_deg": 30,
                       "max_abs_pitch_deg": 25, "max_image_age_days": 365},
        "approved_sites": [{"name": "Queen Street, Cardiff", "latitude": 51.48, "longitude": -3.17}],
        "second_authoriser": {"unapproved_site": True, "under_18": True},
    }
    p.update(overrides)
    return p


POLICY = parse_policy(json.dumps(policy_dict()))


def deployment(status=DRAFT, **kw) -> DeploymentRecord:
    base = dict(id="d1", name="n", purpose="p", site="Queen Street, Cardiff", planned_start_ns=NOW - 3600 * S,
                planned_end_ns=NOW + 3600 * S, cameras=("c1",), threshold=0.5, model_id="m", model_version="v",
                status=status, created_by="builder", builders=("builder",))
    base.update(kw)
    return DeploymentRecord(**base)


def entry(ref="S1", category=pb.CATEGORY_WANTED_BY_POLICE, under_18=False, captured=NOW - 10 * DAY,
          quality=None) -> EntryRecord:
    img = ImageRecord("ab" * 32, captured, dict(quality or GOOD_Q), "f.img")
    return EntryRecord("e-" + ref, "d1", ref, category, "custody", "PACE s.64A", under_18, "builder", NOW,
                       (img,), 1, False, 1)


def refused(fn, *args, **kw) -> Refused:
    with pytest.raises(Refused) as info:
        fn(*args, **kw)
    return info.value


# Policy file -----------------------------------------------------------------------------------------
def test_default_policy_is_valid_and_versioned():
    p = load_policy("")
    assert p.version and len(p.digest) == 64
    assert p.categories == frozenset(CATEGORY_NAMES.values())
    assert p.max_watchlist_size >= 1 and p.min_inter_eye_px > 0


def test_policy_file_is_validated_with_the_field_named(tmp_path):
    bad = [
        (policy_dict(categories=["wanted-by-court", "shoplifters"]), "categories"),
        (policy_dict(max_watchlist_size=0), "max_watchlist_size"),
        (policy_dict(max_watchlist_size="ten"), "max_watchlist_size"),
        ({k: v for k, v in policy_dict().items() if k != "version"}, "version"),
        (policy_dict(enrollment={**policy_dict()["enrollment"], "max_abs_yaw_deg": 120}), "max_abs_yaw_deg"),
        (policy_dict(enrollment={"min_inter_eye_px": 30}), "enrollment."),
        (policy_dict(approved_sites=[{"name": "x", "latitude": 99, "longitude": 0}]), "approved_sites[0]"),
        (policy_dict(colour="blue"), "colour"),
    ]
    for raw, field in bad:
        with pytest.raises(PolicyError, match=field.replace("[", r"\[").replace("]", r"\]")):
            parse_policy(json.dumps(raw))
    with pytest.raises(PolicyError, match="JSON"):
        parse_policy("{not json")
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy_dict(max_watchlist_size=-1)))
    with pytest.raises(ConfigError, match="^LFR_POLICY_FILE"):
        load_policy(str(path))
    with pytest.raises(ConfigError, match="^LFR_POLICY_FILE"):
        load_policy(str(tmp_path / "missing.json"))
    # the digest versions the content: any change of a rule changes it
    assert parse_policy(json.dumps(policy_dict(max_watchlist_size=3))).digest != POLICY.digest


def test_purge_limit_is_never_beyond_a_day():
    assert Config.from_env({}).purge_after_s == 0
    assert Config.from_env({"LFR_PURGE_AFTER_S": "86400"}).purge_after_s == 86400
    for bad in ("86401", "-1"):
        with pytest.raises(ConfigError, match="^LFR_PURGE_AFTER_S"):
            Config.from_env({"LFR_PURGE_AFTER_S": bad})


# Entry refusals ----------------------------------------------------------------------------------------
def test_category_not_allowed_is_refused_with_the_reason():
    assert POLICY.entry_refusal(pb.CATEGORY_WANTED_BY_POLICE, 0) == ""
    reason = POLICY.entry_refusal(pb.CATEGORY_RISK_OF_HARM, 0)
    assert "risk-of-harm is not allowed by policy test-1" in reason


def test_list_too_large_is_refused():
    assert POLICY.entry_refusal(pb.CATEGORY_WANTED_BY_POLICE, 1) == ""
    assert "at most 2 entries" in POLICY.entry_refusal(pb.CATEGORY_WANTED_BY_POLICE, 2)


@pytest.mark.parametrize("figures, why", [
    (dict(n_faces=0), "no face"),
    (dict(n_faces=2), "exactly one"),
    (dict(inter_eye_px=20), "too small"),
    (dict(sharpness=10), "blurred"),
    (dict(yaw_deg=-40), "turned too far"),
    (dict(pitch_deg=30), "tilted too far"),
    (dict(captured_ns=NOW - 400 * DAY), "too old"),
    (dict(captured_ns=0), "capture date unknown"),
    (dict(captured_ns=NOW + 10 * DAY), "future"),
])
def test_poor_image_is_refused_with_the_reason(figures, why):
    args = dict(n_faces=1, inter_eye_px=60, sharpness=300, yaw_deg=5, pitch_deg=3, captured_ns=NOW - DAY)
    assert POLICY.image_refusal(**args, now_ns=NOW) == ""
    assert why in POLICY.image_refusal(**{**args, **figures}, now_ns=NOW)


def test_no_age_limit_accepts_an_unknown_capture_date():
    p = parse_policy(json.dumps(policy_dict(enrollment={**policy_dict()["enrollment"], "max_image_age_days": 0})))
    assert p.image_refusal(1, 60, 300, 0, 0, 0, NOW) == ""


def test_watchlist_is_checked_again_at_authorisation():
    assert watchlist_violations(POLICY, [entry()], NOW) == []
    assert watchlist_violations(POLICY, [], NOW) == ["the watchlist is empty"]
    too_many = [entry(f"S{i}") for i in range(3)]
    assert any("at most 2" in v for v in watchlist_violations(POLICY, too_many, NOW))
    aged = [entry(captured=NOW - 366 * DAY)]  # accepted when added, too old by the time of authorisation
    assert any("too old" in v for v in watchlist_violations(POLICY, aged, NOW))
    assert any("not allowed" in v for v in watchlist_violations(POLICY, [entry(category=pb.CATEGORY_RISK_OF_HARM)], NOW))


# Lifecycle ---------------------------------------------------------------------------------------------
def test_the_full_lifecycle():
    d = deployment()
    digest = composition_digest(d, [entry()])
    d = d.approve("officer", digest, "", 1, [], NOW)
    assert d.status == AUTHORISED and d.authorised_digest == digest
    d = d.start(NOW, digest)
    assert d.status == ACTIVE and d.started_at_ns == NOW
    d = d.end(NOW + S, "done")
    assert d.status == ENDED and d.purge_due_ns(0) == NOW + S
    d = d.purged(NOW + 2 * S)
    assert d.status == PURGED and d.purged_at_ns == NOW + 2 * S and d.purge_due_ns(0) == 0


@pytest.mark.parametrize("status, action", [
    (DRAFT, "start"), (DRAFT, "end"), (DRAFT, "purge"),
    (AUTHORISED, "authorise"), (AUTHORISED, "end"),
    (ACTIVE, "authorise"), (ACTIVE, "start"), (ACTIVE, "cancel"), (ACTIVE, "purge"),
    (ENDED, "start"), (ENDED, "end"), (ENDED, "cancel"), (ENDED, "authorise"),
    (PURGED, "start"), (PURGED, "end"), (PURGED, "purge"), (PURGED, "cancel"),
    (CANCELLED, "start"), (CANCELLED, "authorise"), (CANCELLED, "cancel"),
])
def test_invalid_transitions_are_failed_precondition(status, action):
    exc = refused(deployment(status).check, action)
    assert exc.code == "FAILED_PRECONDITION" and action in exc.message


def test_cancel_from_draft_or_authorised_and_the_purge_keeps_cancelled():
    for status in (DRAFT, AUTHORISED):
        d = deployment(status).cancel(NOW, "no longer needed")
        assert d.status == CANCELLED and d.due_action(NOW, 0) == "purge"
        d = d.purged(NOW)
        assert d.status == CANCELLED and d.purged_at_ns == NOW and d.due_action(NOW, 0) == ""


def test_start_only_inside_the_window_and_with_the_authorised_list():
    d = deployment(AUTHORISED, authorised_digest="x")
    assert "opens at" in refused(d.start, d.planned_start_ns - S, "x").message
    assert "closed at" in refused(d.start, d.planned_end_ns, "x").message
    assert "authorisation again" in refused(d.start, NOW, "y").message
    assert d.start(d.planned_start_ns, "x").status == ACTIVE


# Authorisation -----------------------------------------------------------------------------------------
def test_self_authorisation_is_refused():
    d = deployment(builders=("builder", "helper"))
    for who in ("builder", "helper"):
        exc = refused(d.approve, who, "x", "", 1, [], NOW)
        assert exc.code == "PERMISSION_DENIED" and "cannot authorise" in exc.message
    assert refused(d.approve, "", "x", "", 1, [], NOW).code == "INVALID_ARGUMENT"


def test_a_change_after_authorisation_returns_to_draft_and_voids_the_approval():
    d = deployment()
    before = composition_digest(d, [entry()])
    d = d.approve("officer", before, "", 1, [], NOW)
    changed = d.changed_by("helper")
    assert changed.status == DRAFT and changed.approvals == () and changed.authorised_digest == ""
    assert "helper" in changed.builders  # who changed the list cannot authorise it now
    after = composition_digest(changed, [entry(), entry("S2")])
    assert after != before
    assert refused(changed.approve, "helper", after, "", 1, [], NOW).code == "PERMISSION_DENIED"
    # an approval of what was reviewed before the change is refused
    assert "changed since" in refused(changed.approve, "officer", after, before, 1, [], NOW).message
    assert changed.approve("officer", after, after, 1, [], NOW).status == AUTHORISED


def test_no_change_once_started_or_finished():
    for status in (ACTIVE, ENDED, PURGED, CANCELLED):
        exc = refused(deployment(status).changed_by, "builder")
        assert exc.code == "FAILED_PRECONDITION" and "cannot change" in exc.message


def test_digest_covers_entries_provenance_model_and_threshold():
    d = deployment()
    base = composition_digest(d, [entry()])
    assert composition_digest(d, [entry()]) == base
    assert composition_digest(d, [entry(category=pb.CATEGORY_WANTED_BY_COURT)]) != base
    assert composition_digest(d, [entry(captured=NOW - 5 * DAY)]) != base
    assert composition_digest(deployment(threshold=0.6), [entry()]) != base
    assert composition_digest(deployment(model_version="v2"), [entry()]) != base


def test_unapproved_site_and_under_18_need_a_second_authoriser():
    assert POLICY.second_authoriser_reasons("queen street,  cardiff", False) == []  # names compare loosely
    reasons = POLICY.second_authoriser_reasons("Somewhere else", True)
    assert len(reasons) == 2 and "not an approved site" in reasons[0] and "under 18" in reasons[1]
    d = deployment(site="Somewhere else")
    digest = "x"
    d = d.approve("officer-1", digest, "", 2, reasons, NOW)
    assert d.status == DRAFT and len(d.approvals) == 1  # one approval recorded, a second one needed
    exc = refused(d.approve, "officer-1", digest, "", 2, reasons, NOW)
    assert "second authoriser" in exc.message
    d = d.approve("officer-2", digest, "", 2, reasons, NOW)
    assert d.status == AUTHORISED and [a.actor for a in d.approvals] == ["officer-1", "officer-2"]


def test_approvals_of_an_earlier_composition_do_not_count():
    d = deployment().approve("officer-1", "old", "", 2, ["r"], NOW)
    d = d.approve("officer-2", "new", "", 2, ["r"], NOW)
    assert d.status == DRAFT and [a.actor for a in d.approvals] == ["officer-2"]


def test_the_purge_keeps_only_nominal_ids_categories_and_counts():
    e = entry(under_18=True).purged()
    assert (e.subject_ref, e.category, e.image_count) == ("S1", pb.CATEGORY_WANTED_BY_POLICE, 1)
    assert e.images == () and e.vectors == 0 and e.source_system == e.legal_basis == e.added_by == ""


# Time: automatic end, purge deadline, liveness ----------------------------------------------------------
def test_sweeper_decisions():
    d = deployment(ACTIVE)
    assert d.due_action(d.planned_end_ns - 1, 0) == ""
    assert d.due_action(d.planned_end_ns, 0) == "end"
    ended = d.end(d.planned_end_ns, "planned end passed")
    assert ended.due_action(d.planned_end_ns, 0) == "purge"
    assert ended.due_action(d.planned_end_ns, 3600 * S) == ""
    assert ended.due_action(d.planned_end_ns + 3600 * S, 3600 * S) == "purge"
    assert deployment(DRAFT).due_action(d.planned_end_ns + DAY, 0) == ""  # a draft never runs: nothing to end


def test_new_deployment_needs_an_actor_a_site_a_purpose_and_a_window():
    req = pb.CreateDeploymentRequest(name="x", cameras=["c"], actor="a", site="s", purpose="p",
                                     planned_start=ts_from_ns(NOW), planned_end=ts_from_ns(NOW + 3600 * S))
    assert validate_governance(req, NOW) == ""
    for field, value, why in [("actor", "", "actor"), ("site", " ", "site"), ("purpose", "", "purpose")]:
        bad = pb.CreateDeploymentRequest()
        bad.CopyFrom(req)
        setattr(bad, field, value)
        assert why in validate_governance(bad, NOW)
    no_window = pb.CreateDeploymentRequest(name="x", cameras=["c"], actor="a", site="s", purpose="p")
    assert "time-limited" in validate_governance(no_window, NOW)
    assert "past" in validate_governance(req, NOW + 3600 * S)


def test_live_refusal_is_the_one_rule_for_frames_and_alerts():
    d = pb.Deployment(id="d1", status=pb.DEPLOYMENT_STATUS_ACTIVE, cameras=["c1"],
                      planned_start=ts_from_ns(NOW - 60 * S), planned_end=ts_from_ns(NOW + 60 * S))
    assert live_refusal(d, "c1", NOW) == ""
    assert "camera" in live_refusal(d, "c2", NOW)
    assert "expired" in live_refusal(d, "c1", NOW + 60 * S)
    assert "planned start" in live_refusal(d, "c1", NOW - 61 * S)
    assert "unknown" in live_refusal(None, "c1", NOW)
    for status in (pb.DEPLOYMENT_STATUS_DRAFT, pb.DEPLOYMENT_STATUS_AUTHORISED, pb.DEPLOYMENT_STATUS_ENDED):
        d.status = status
        assert "not ACTIVE" in live_refusal(d, "c1", NOW)
    d.status, d.end_reason = pb.DEPLOYMENT_STATUS_ENDED, "planned end passed"
    assert "planned end passed" in live_refusal(d, "c1", NOW)


def test_audit_maps_governance_events_to_record_types():
    from lfr.audit.core import record_from_event
    from lfr.runtime import events

    ev = pb.WatchlistEvent(envelope=events.envelope("watchlist"), action="reference_added", subject_ref="CUST-1",
                           actor="records")
    r = record_from_event("lfr.v1.watchlist.reference", ev.SerializeToString())
    assert (r.type, r.subject, r.actor) == ("reference.added", "CUST-1", "records")
    ev = pb.WatchlistEvent(envelope=events.envelope("watchlist", "d1"), action="entry_refused", subject_ref="S1",
                           reason="category not allowed")
    r = record_from_event("lfr.v1.watchlist.d1", ev.SerializeToString())
    assert (r.type, r.subject, r.deployment_id) == ("watchlist.entry_refused", "S1", "d1")
    assert json.loads(r.summary_json)["reason"] == "category not allowed"
    ev = pb.DeploymentEvent(envelope=events.envelope("watchlist", "d1"), deployment=pb.Deployment(id="d1"),
                            action="authorisation_refused", actor="builder", reason="built it")
    r = record_from_event("lfr.v1.lifecycle.d1", ev.SerializeToString())
    assert (r.type, r.actor, r.subject) == ("deployment.authorisation_refused", "builder", "d1")

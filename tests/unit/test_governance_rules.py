"""Issue 16 rules in the pure cores: the written authority the policy requires (and its place in the authorised
digest), time limits, urgent use with its confirmation limit on a moved clock, the threshold floor, the expected
false-alert figure against the shipped table, and the policy's equitability attributes."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
from test_watchlist_policy import DAY, NOW, S, deployment, entry, policy_dict, refused

from lfr.models import nonmated
from lfr.pb import watchlist_pb2 as pb
from lfr.policy import PolicyError, parse_policy
from lfr.runtime.clock import ManualClock
from lfr.runtime.events import ts_from_ns
from lfr.watchlist.core import (
    ACTIVE,
    DRAFT,
    ENDED,
    DeploymentRecord,
    composition_digest,
    validate_governance,
)
from lfr.watchlist.service import load_policy

HOUR = 3600 * S
GOV = {
    "authority_fields": [
        {"name": "policing_purpose", "label": "the policing purpose", "required": True},
        {"name": "dpia_reference", "label": "DPIA reference", "required": True},
        {"name": "community_impact", "label": "community impact summary", "required": False},
    ],
    "time_limits": {"max_deployment_hours": 12, "max_days_ahead": 7},
    "urgent": {"ranks": ["superintendent"], "confirm_within_hours": 24},
    "threshold_floors": {"sface-2021dec": {"floor": 0.467, "reason": "NPL: no differences at or above"}},
    "equitability": {"attributes": {"perceived_sex": ["female", "male"], "age_band": ["18-24", "25-34"]},
                     "min_count": 3},
}
POLICY = parse_policy(json.dumps(policy_dict(**GOV)))
AUTHORITY = {"policing_purpose": "locate people wanted on warrant", "dpia_reference": "DPIA-2026-014"}


def request(**kw) -> pb.CreateDeploymentRequest:
    base = dict(name="x", cameras=["c"], actor="a", site="s", purpose="p", planned_start=ts_from_ns(NOW),
                planned_end=ts_from_ns(NOW + 4 * HOUR), authority=AUTHORITY)
    base.update(kw)
    return pb.CreateDeploymentRequest(**base)


# 1. The written authority ------------------------------------------------------------------------------
def test_a_missing_mandatory_authority_field_is_refused_naming_the_field():
    assert validate_governance(request(), NOW, POLICY, "sface-2021dec", 0.5) == ""
    for missing in ("policing_purpose", "dpia_reference"):
        authority = {k: v for k, v in AUTHORITY.items() if k != missing}
        why = validate_governance(request(authority=authority), NOW, POLICY, "sface-2021dec", 0.5)
        assert f"authority field {missing}" in why and "authority_fields of policy test-1" in why
    blank = validate_governance(request(authority=AUTHORITY | {"dpia_reference": "  "}), NOW, POLICY, "m", 0.5)
    assert "dpia_reference" in blank
    unknown = validate_governance(request(authority=AUTHORITY | {"mood": "fine"}), NOW, POLICY, "m", 0.5)
    assert "'mood' is not one the policy names" in unknown
    # the optional one may be left out; a policy without authority_fields asks for none
    assert validate_governance(request(authority={}), NOW, parse_policy(json.dumps(policy_dict())), "m", 0.5) == ""


def test_the_authority_is_part_of_the_authorised_digest():
    e = [entry()]
    plain = composition_digest(deployment(), e)
    with_authority = composition_digest(deployment(authority=AUTHORITY), e)
    changed = composition_digest(deployment(authority=AUTHORITY | {"dpia_reference": "DPIA-2026-015"}), e)
    assert len({plain, with_authority, changed}) == 3
    assert composition_digest(deployment(authority={}), e) == plain  # records from before #16 keep their digest


# 2. Time limits ---------------------------------------------------------------------------------------
def test_time_limits_refuse_naming_the_rule():
    too_long = request(planned_end=ts_from_ns(NOW + 400 * DAY))
    why = validate_governance(too_long, NOW, POLICY, "m", 0.5)
    assert "at most 12" in why and "time_limits.max_deployment_hours of policy test-1" in why
    far = request(planned_start=ts_from_ns(NOW + 8 * DAY), planned_end=ts_from_ns(NOW + 8 * DAY + HOUR))
    why = validate_governance(far, NOW, POLICY, "m", 0.5)
    assert "8.0 days ahead" in why and "time_limits.max_days_ahead" in why
    assert validate_governance(request(planned_end=ts_from_ns(NOW + 12 * HOUR)), NOW, POLICY, "m", 0.5) == ""


def test_default_policy_limits_a_400_day_deployment():
    p = load_policy("")
    assert "max_deployment_hours" in p.time_refusal(NOW, NOW + 400 * DAY, NOW)
    assert p.urgent_confirm_hours <= 24 and p.urgent_ranks


def test_policy_sections_are_validated():
    for bad, why in [
        ({"urgent": {"ranks": ["superintendent"], "confirm_within_hours": 48}}, "urgent.confirm_within_hours"),
        ({"urgent": {"ranks": [], "confirm_within_hours": 4}}, "urgent.ranks"),
        ({"threshold_floors": {"m": {"floor": 0.5}}}, "threshold_floors.m.reason"),
        ({"authority_fields": [{"name": "Bad Name"}]}, "authority_fields[0].name"),
        ({"equitability": {"attributes": {"sex": []}}}, "equitability.attributes.sex"),
        ({"time_limits": {"max_hours": 3}}, "time_limits.max_hours"),
    ]:
        with pytest.raises(PolicyError, match=why.replace("[", r"\[").replace("]", r"\]")):
            parse_policy(json.dumps(policy_dict(**bad)))


# 3. Urgent use ----------------------------------------------------------------------------------------
def urgent_started(clock: ManualClock) -> DeploymentRecord:
    d = deployment(DRAFT, planned_end_ns=NOW + 20 * DAY)
    return d.start_urgent(clock.now_ns(), "supt", "superintendent", "a missing child at risk", 24 * HOUR, "dig")


def test_urgent_start_needs_a_rank_the_policy_names_and_a_reason():
    assert "superintendent" in POLICY.urgent_refusal("inspector")
    assert POLICY.urgent_refusal("Superintendent") == ""
    assert "does not allow urgent use" in parse_policy(json.dumps(policy_dict())).urgent_refusal("superintendent")
    d = deployment(DRAFT)
    assert refused(d.start_urgent, NOW, "supt", "superintendent", " ", HOUR, "dig").code == "INVALID_ARGUMENT"
    assert refused(d.start_urgent, NOW, "builder", "superintendent", "why", HOUR, "dig").code == "PERMISSION_DENIED"


def test_urgent_use_without_confirmation_lapses_at_the_limit_on_a_moved_clock():
    clock = ManualClock(NOW)
    d = urgent_started(clock)
    assert d.status == ACTIVE and d.urgent and d.urgent_confirm_by_ns == NOW + 24 * HOUR
    clock.advance(24 * 3600 - 1)
    assert d.due_action(clock.now_ns(), 0) == ""
    clock.advance(1)
    assert d.due_action(clock.now_ns(), 0) == "urgent_lapsed"  # before the planned end: stop and purge
    ended = d.end(clock.now_ns(), "urgent use not confirmed")
    assert ended.due_action(clock.now_ns(), DAY) == "urgent_lapsed"  # the alerts' images go too
    lapsed = ended.__class__(**{**ended.__dict__, "urgent_lapsed_at_ns": clock.now_ns()})
    assert lapsed.due_action(clock.now_ns(), 0) == "purge"
    assert refused(d.confirm, "ao", "dig", "", 1, [], clock.now_ns()).code == "FAILED_PRECONDITION"


def test_urgent_use_confirmed_in_time_continues():
    clock = ManualClock(NOW)
    d = urgent_started(clock)
    clock.advance(3 * 3600)
    assert refused(d.confirm, "supt", "dig", "", 1, [], clock.now_ns()).code == "PERMISSION_DENIED"  # not oneself
    assert refused(d.confirm, "ao", "other", "", 1, [], clock.now_ns()).code == "FAILED_PRECONDITION"
    half = d.confirm("ao", "dig", "", 2, ["site 's' is not an approved site"], clock.now_ns())
    assert half.urgent_unconfirmed  # two authorisers needed: one is not enough
    done = half.confirm("ao2", "dig", "", 2, ["site 's' is not an approved site"], clock.now_ns())
    assert not done.urgent_unconfirmed and done.urgent_confirmed_at_ns == clock.now_ns()
    clock.advance(48 * 3600)
    assert done.status == ACTIVE and done.due_action(clock.now_ns(), 0) == ""  # runs to its planned end


# 4. Threshold floor and expected false alerts ------------------------------------------------------------
def test_a_threshold_under_the_floor_needs_a_reason():
    why = validate_governance(request(), NOW, POLICY, "sface-2021dec", 0.40)
    assert "under the floor 0.467" in why and "threshold_floors of policy test-1" in why and "NPL" in why
    assert validate_governance(request(threshold_reason="missing child, low-quality custody image"), NOW, POLICY,
                               "sface-2021dec", 0.40) == ""
    assert validate_governance(request(), NOW, POLICY, "sface-2021dec", 0.467) == ""  # at the floor: fine
    assert validate_governance(request(), NOW, POLICY, "dlib-resnet-v1", 0.1) == ""  # no floor for that model


def test_expected_false_alerts_match_the_shipped_table():
    table = nonmated.load_table("sface-2021dec")
    assert table is not None and table.pairs > 100_000 and "lfw-dev" in table.command
    raw = json.loads((files("lfr.models") / "nonmated_sface-2021dec.json").read_text())
    for threshold, size in ((0.467, 1), (0.467, 500), (0.40, 1000), (0.30, 50)):
        i = max(k for k, t in enumerate(raw["thresholds"]) if t <= threshold)  # the grid step at or below
        rate = raw["rates"][i]
        per_10k, shown_rate, name = nonmated.expected("sface-2021dec", threshold, size)
        assert shown_rate == rate and "nonmated_sface-2021dec.json" in name
        assert per_10k == pytest.approx(10_000 * (1 - (1 - rate) ** size))
    assert nonmated.expected("no-such-model", 0.5, 10)[0] == -1.0
    # more entries, more false alerts; a higher threshold, fewer
    assert nonmated.expected("sface-2021dec", 0.467, 1000)[0] > nonmated.expected("sface-2021dec", 0.467, 10)[0]
    assert nonmated.expected("sface-2021dec", 0.5, 100)[0] <= nonmated.expected("sface-2021dec", 0.4, 100)[0]


# 5. Equitability attributes ------------------------------------------------------------------------------
def test_adjudication_attributes_are_the_policys():
    """match checks an adjudication's attributes against the policy's equitability.attributes."""
    from lfr.match.core import engagement_refusal
    from lfr.pb import match_pb2

    allowed = dict(POLICY.equitability)

    def refusal(attributes):
        return engagement_refusal(match_pb2.OUTCOME_FALSE_ALERT, 0, False, attributes, allowed)

    assert refusal({"perceived_sex": "female", "age_band": "18-24"}) == ""
    assert "'ethnicity' is not one the policy names" in refusal({"ethnicity": "x"})
    assert "not one of female, male" in refusal({"perceived_sex": "other"})
    assert POLICY.equitability_min_count == 3


def test_ended_status_is_kept_for_a_lapsed_urgent_deployment():
    clock = ManualClock(NOW)
    d = urgent_started(clock).end(NOW + HOUR, "ended by an officer")
    assert d.status == ENDED and d.urgent_unconfirmed

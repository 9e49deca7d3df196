"""The deployment policy: who may be on a watchlist and where it may be used, as code (pure, no I/O).

A policy file (JSON) is loaded and validated when the watchlist service starts; its version and digest are
recorded with every deployment, and each decision below names the rule and the policy version it applied. A
library module: the watchlist service applies it, the CLI and tools/deploy_check read and validate it.

    {
      "version": "force-2025-03",                    # required, recorded with each deployment
      "categories": ["wanted-by-court", ...],        # allowed subset of CATEGORY_NAMES
      "max_watchlist_size": 1000,
      "enrollment": {"min_inter_eye_px": 24, "min_sharpness": 40, "max_abs_yaw_deg": 45,
                     "max_abs_pitch_deg": 30, "max_image_age_days": 1825},   # 0 = no age limit
      "approved_sites": [{"name": "Queen Street, Cardiff", "latitude": 51.48, "longitude": -3.17}],
      "second_authoriser": {"unapproved_site": true, "under_18": true},
      # optional, #16 (governance a regulator checks):
      "authority_fields": [{"name": "dpia_reference", "label": "DPIA reference", "required": true}, ...],
      "time_limits": {"max_deployment_hours": 24, "max_days_ahead": 30},
      "urgent": {"ranks": ["superintendent"], "confirm_within_hours": 24},   # absent: no urgent use
      "threshold_floors": {"sface-2021dec": {"floor": 0.467, "reason": "why this floor"}},
      "equitability": {"attributes": {"perceived_sex": ["female", "male"]}, "min_count": 3},
      # optional, #17: the false-accept target `lfr model check` derives an engine's default threshold at
      "engines": {"false_accept_target": 1e-5}
    }
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from lfr.models.face_choice import Candidate, dominant_index
from lfr.pb import watchlist_pb2 as pb

NS_PER_DAY = 86_400 * 1_000_000_000

# The closed set of categories, as operators spell them (CLI, policy file) and as the API numbers them.
CATEGORY_NAMES: dict[str, int] = {
    "wanted-by-court": pb.CATEGORY_WANTED_BY_COURT,
    "wanted-by-police": pb.CATEGORY_WANTED_BY_POLICE,
    "court-conditions": pb.CATEGORY_COURT_CONDITIONS,
    "missing-vulnerable": pb.CATEGORY_MISSING_VULNERABLE,
    "risk-of-harm": pb.CATEGORY_RISK_OF_HARM,
}
CATEGORY_BY_VALUE = {v: k for k, v in CATEGORY_NAMES.items()}

_TOP_KEYS = {"version", "description", "categories", "max_watchlist_size", "enrollment", "approved_sites",
             "second_authoriser", "authority_fields", "time_limits", "urgent", "threshold_floors", "equitability", "engines"}
NS_PER_HOUR = 3600 * 1_000_000_000
URGENT_MAX_HOURS = 24  # the EU AI Act's limit for confirming urgent use of real-time remote identification
_ENROLL_KEYS = {"min_inter_eye_px", "min_sharpness", "max_abs_yaw_deg", "max_abs_pitch_deg", "max_image_age_days"}
# Optional: what an image with several faces does (#14). "refuse" (the default) asks the enroller to choose one;
# "dominant" takes the face the photo is clearly about (lfr.models.face_choice, margins measured by
# `lfr bench dominant`). A face chosen by the enroller (face=N) is always taken.
SEVERAL_FACES = ("refuse", "dominant")
DOMINANT_MIN_SIZE_RATIO = 2.0  # lfr bench dominant: on LFW size alone is then never a bystander (0 of 900)
DOMINANT_MAX_CENTRE_OFFSET = 0.75  # every single-face portrait of the shared data lies within 0.67
_ENROLL_OPTIONAL = {"several_faces", "dominant_min_size_ratio", "dominant_max_centre_offset"}
_SECOND_KEYS = {"unapproved_site", "under_18"}
# The share of impostor pairs an engine's default threshold accepts (`lfr model check`, #17): the rule the
# built-in thresholds follow. A policy may set it (engines.false_accept_target), in (0, 0.01].
FALSE_ACCEPT_TARGET = 1e-5
FALSE_ACCEPT_TARGET_MAX = 0.01


class PolicyError(ValueError):
    """The policy file is invalid; the message names the field."""


def category_name(value: int) -> str:
    return CATEGORY_BY_VALUE.get(value, f"category-{value}")


def site_key(name: str) -> str:
    return " ".join(name.split()).casefold()


@dataclass(frozen=True)
class Site:
    name: str
    latitude: float
    longitude: float


@dataclass(frozen=True)
class AuthorityField:
    name: str
    label: str
    required: bool


@dataclass(frozen=True)
class Floor:
    floor: float
    reason: str


@dataclass(frozen=True)
class Policy:
    version: str
    digest: str
    canonical_json: str
    categories: frozenset[int]
    max_watchlist_size: int
    min_inter_eye_px: float
    min_sharpness: float
    max_abs_yaw_deg: float
    max_abs_pitch_deg: float
    max_image_age_days: int
    approved_sites: tuple[Site, ...]
    second_for_unapproved_site: bool
    second_for_under_18: bool
    authority_fields: tuple[AuthorityField, ...] = ()
    max_deployment_hours: float = 0.0  # 0 = no limit
    max_days_ahead: float = 0.0
    urgent_ranks: tuple[str, ...] = ()  # empty: urgent use is not allowed
    urgent_confirm_hours: float = 0.0
    threshold_floors: tuple[tuple[str, Floor], ...] = ()
    equitability: tuple[tuple[str, tuple[str, ...]], ...] = ()  # attribute -> allowed values
    equitability_min_count: int = 0
    false_accept_target: float = FALSE_ACCEPT_TARGET  # engines.false_accept_target (#17, lfr model check)
    several_faces: str = "refuse"  # an image with several faces: "refuse" or "dominant" (#14)
    dominant_min_size_ratio: float = DOMINANT_MIN_SIZE_RATIO
    dominant_max_centre_offset: float = DOMINANT_MAX_CENTRE_OFFSET

    def rule(self, key: str) -> str:
        """Where a rule is set, for messages people read."""
        return f"{key} of policy {self.version}, LFR_POLICY_FILE"

    # Written authority, time limits, urgent use, threshold floor (#16) --------------------------------
    def authority_refusal(self, authority: dict[str, str]) -> str:
        """'' if a deployment's written authority holds every field the policy requires and no other."""
        known = {f.name for f in self.authority_fields}
        for name in sorted(authority):
            if name not in known:
                allowed = ", ".join(sorted(known)) or "none"
                return f"authority field {name!r} is not one the policy names (authority_fields: {allowed})"
        for f in self.authority_fields:
            if f.required and not authority.get(f.name, "").strip():
                return (f"authority field {f.name} ({f.label}) is required by "
                        f"{self.rule('authority_fields')}")
        return ""

    def time_refusal(self, start_ns: int, end_ns: int, now_ns: int) -> str:
        """'' if a deployment's window keeps to the policy's time limits."""
        hours = (end_ns - start_ns) / NS_PER_HOUR
        if self.max_deployment_hours and hours > self.max_deployment_hours:
            return (f"the deployment would last {hours:.1f} hours: at most {self.max_deployment_hours:g} "
                    f"({self.rule('time_limits.max_deployment_hours')})")
        days = (start_ns - now_ns) / NS_PER_DAY
        if self.max_days_ahead and days > self.max_days_ahead:
            return (f"the deployment starts {days:.1f} days ahead: at most {self.max_days_ahead:g} "
                    f"({self.rule('time_limits.max_days_ahead')})")
        return ""

    def urgent_refusal(self, rank: str) -> str:
        if not self.urgent_ranks:
            return f"policy {self.version} does not allow urgent use (no 'urgent' section in LFR_POLICY_FILE)"
        if rank.strip().casefold() not in {r.casefold() for r in self.urgent_ranks}:
            return (f"urgent use needs an officer of rank {' or '.join(self.urgent_ranks)} "
                    f"({self.rule('urgent.ranks')}); rank given: {rank.strip() or 'none'}")
        return ""

    def floor(self, model_id: str) -> Floor | None:
        return dict(self.threshold_floors).get(model_id)

    def threshold_refusal(self, model_id: str, threshold: float, reason: str) -> str:
        """'' if the threshold is at or above the model's floor, or under it with a stated reason."""
        f = self.floor(model_id)
        if f is None or threshold >= f.floor or reason.strip():
            return ""
        return (f"threshold {threshold:g} is under the floor {f.floor:g} for {model_id} "
                f"({self.rule('threshold_floors')}: {f.reason}); a lower threshold needs a stated reason "
                "(threshold_reason)")

    # Sites -----------------------------------------------------------------------------------------
    def approved_site(self, name: str) -> Site | None:
        return next((s for s in self.approved_sites if site_key(s.name) == site_key(name)), None)

    # Entries ---------------------------------------------------------------------------------------
    def entry_refusal(self, category: int, size_before: int) -> str:
        """'' if an entry of this category may join a watchlist that holds `size_before` entries."""
        if category not in self.categories:
            allowed = ", ".join(sorted(category_name(c) for c in self.categories))
            return (f"category {category_name(category)} is not allowed by policy {self.version} "
                    f"(allowed: {allowed})")
        if size_before >= self.max_watchlist_size:
            return (f"watchlist is full: policy {self.version} allows at most {self.max_watchlist_size} entries "
                    f"(max_watchlist_size in LFR_POLICY_FILE)")
        return ""

    def _setting(self, key: str) -> str:
        """Where a limit a person reads about is set: its key in the policy file."""
        return f"enrollment.{key} of policy {self.version}, LFR_POLICY_FILE"

    def enrollment_face(self, width: int, height: int, faces: list[Candidate], requested: int = 0
                        ) -> tuple[int, str, str]:
        """Which face of an enrollment image to enroll: (0-based index or -1, refusal reason, how it was chosen).

        One face: that face. Several: the one the enroller chose (`requested`, 1-based, as the refusal numbers
        them), else under ``several_faces: dominant`` the face the photo is clearly about (the gallery's central
        face, by this policy's margins: `lfr.models.face_choice`), else a refusal that lists every face."""
        n = len(faces)
        if n == 0:
            return -1, "no face found", ""
        if requested < 0:
            return -1, f"face {requested} does not exist: faces are numbered from 1", ""
        if requested:
            if requested > n:
                return -1, f"face {requested} does not exist: the image holds {n} face(s)", ""
            return requested - 1, "", (f"face {requested} of {n}, chosen by the enroller" if n > 1 else "")
        if n == 1:
            return 0, "", ""
        listing = "; ".join(
            f"face {i + 1}: box ({f.box[0]:.0f},{f.box[1]:.0f})-({f.box[2]:.0f},{f.box[3]:.0f}), "
            f"{f.inter_eye_px:.0f} px between the eyes, detector score {f.score:.2f}" for i, f in enumerate(faces))
        if self.several_faces == "dominant":
            c = dominant_index(width, height, faces, self.dominant_min_size_ratio, self.dominant_max_centre_offset)
            if c.index >= 0:
                return c.index, "", (f"{c.why} (enrollment.several_faces=dominant, ratio >= "
                                     f"{self.dominant_min_size_ratio:g}, offset <= {self.dominant_max_centre_offset:g},"
                                     f" policy {self.version})")
            return -1, (f"{n} faces found and none dominates ({c.why}): choose one with --face N (face in the "
                        f"request) [{listing}]"), ""
        return -1, (f"{n} faces found; an enrollment image must show exactly one: choose one with --face N (face in "
                    f"the request), or set enrollment.several_faces to \"dominant\" (policy {self.version}, LFR_POLICY_FILE) [{listing}]"), ""

    def image_refusal(self, n_faces: int, inter_eye_px: float, sharpness: float, yaw_deg: float,
                      pitch_deg: float, captured_ns: int, now_ns: int) -> str:
        """'' if an enrollment image passes the quality gate and the age limit, else the reason it is refused."""
        reason = enrollment_verdict(n_faces, inter_eye_px, self.min_inter_eye_px, self._setting("min_inter_eye_px"))
        if reason:
            return reason
        if sharpness < self.min_sharpness:
            return (f"image too blurred: sharpness {sharpness:.0f} (minimum {self.min_sharpness:g}: "
                    f"{self._setting('min_sharpness')})")
        if abs(yaw_deg) > self.max_abs_yaw_deg:
            return (f"face turned too far: yaw {yaw_deg:.0f} degrees (at most {self.max_abs_yaw_deg:g}: "
                    f"{self._setting('max_abs_yaw_deg')})")
        if abs(pitch_deg) > self.max_abs_pitch_deg:
            return (f"face tilted too far: pitch {pitch_deg:.0f} degrees (at most {self.max_abs_pitch_deg:g}: "
                    f"{self._setting('max_abs_pitch_deg')})")
        return self.age_refusal(captured_ns, now_ns)

    def age_refusal(self, captured_ns: int, now_ns: int) -> str:
        if not self.max_image_age_days:
            return ""
        if not captured_ns:
            return (f"capture date unknown: policy {self.version} allows images at most {self.max_image_age_days} days "
                    f"old ({self._setting('max_image_age_days')}); give --captured, or an image with an EXIF date")
        if captured_ns > now_ns + NS_PER_DAY:
            return "capture date is in the future"
        age_days = (now_ns - captured_ns) / NS_PER_DAY
        if age_days > self.max_image_age_days:
            return (f"image too old: captured {age_days:.0f} days ago (at most {self.max_image_age_days}: "
                    f"{self._setting('max_image_age_days')})")
        return ""

    # Authorisation ---------------------------------------------------------------------------------
    def second_authoriser_reasons(self, site: str, any_under_18: bool) -> list[str]:
        reasons = []
        if self.second_for_unapproved_site and self.approved_site(site) is None:
            reasons.append(f"site {site!r} is not an approved site")
        if self.second_for_under_18 and any_under_18:
            reasons.append("the watchlist holds an entry flagged as under 18")
        return reasons


def enrollment_verdict(n_faces: int, inter_eye_px: float, min_inter_eye_px: float, setting: str = "") -> str:
    """'' if an image shows exactly one face with enough pixels between the eyes, else the reason (naming
    `setting`, where the minimum is set, when given)."""
    if n_faces == 0:
        return "no face found"
    if n_faces > 1:
        return f"{n_faces} faces found; an enrollment image must show exactly one"
    if inter_eye_px < min_inter_eye_px:
        return (f"face too small: {inter_eye_px:.0f} px between the eyes (minimum {min_inter_eye_px:.0f}"
                + (f": {setting})" if setting else ")"))
    return ""


def _number(section: dict, key: str, where: str, minimum: float = 0.0, integer: bool = False) -> float:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{where}{key}: must be a number")
    if integer and value != int(value):
        raise PolicyError(f"{where}{key}: must be a whole number")
    if value < minimum:
        raise PolicyError(f"{where}{key}: must be at least {minimum:g}")
    return int(value) if integer else float(value)


def _unknown(section: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(section) - allowed)
    if extra:
        raise PolicyError(f"{where}{extra[0]}: unknown field")


def parse_policy(text: str) -> Policy:
    """Parse and validate a policy file's text. Raises PolicyError naming the offending field."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(raw, dict):
        raise PolicyError("the policy must be a JSON object")
    _unknown(raw, _TOP_KEYS, "")
    for key in ("version", "categories", "max_watchlist_size", "enrollment", "approved_sites"):
        if key not in raw:
            raise PolicyError(f"{key}: required")
    version = raw["version"]
    if not isinstance(version, str) or not version.strip():
        raise PolicyError("version: must be a non-empty string")

    cats = raw["categories"]
    if not isinstance(cats, list) or not cats:
        raise PolicyError("categories: must be a non-empty list")
    for c in cats:
        if c not in CATEGORY_NAMES:
            raise PolicyError(f"categories: unknown category {c!r} (known: {', '.join(CATEGORY_NAMES)})")

    max_size = _number(raw, "max_watchlist_size", "", 1, integer=True)

    enroll = raw["enrollment"]
    if not isinstance(enroll, dict):
        raise PolicyError("enrollment: must be an object")
    _unknown(enroll, _ENROLL_KEYS | _ENROLL_OPTIONAL, "enrollment.")
    for key in _ENROLL_KEYS:
        if key not in enroll:
            raise PolicyError(f"enrollment.{key}: required")
    e = {k: _number(enroll, k, "enrollment.", integer=(k == "max_image_age_days")) for k in _ENROLL_KEYS}
    several = enroll.get("several_faces", "refuse")
    if several not in SEVERAL_FACES:
        raise PolicyError(f"enrollment.several_faces: must be one of {', '.join(SEVERAL_FACES)}")
    dominant = {"dominant_min_size_ratio": DOMINANT_MIN_SIZE_RATIO,
                "dominant_max_centre_offset": DOMINANT_MAX_CENTRE_OFFSET}
    for key in dominant:
        if key in enroll:
            dominant[key] = _number(enroll, key, "enrollment.")
    if dominant["dominant_min_size_ratio"] < 1:
        raise PolicyError("enrollment.dominant_min_size_ratio: must be at least 1 (the chosen face the largest)")
    if dominant["dominant_max_centre_offset"] > 1:
        raise PolicyError("enrollment.dominant_max_centre_offset: must be at most 1 (a fraction of the half image)")
    for key in ("max_abs_yaw_deg", "max_abs_pitch_deg"):
        if e[key] > 90:
            raise PolicyError(f"enrollment.{key}: must be at most 90")

    sites = []
    for where, s in _objects(raw["approved_sites"], "approved_sites", {"name", "latitude", "longitude"}):
        if not isinstance(s.get("name"), str) or not s["name"].strip():
            raise PolicyError(f"{where}name: must be a non-empty string")
        lat = _number(s, "latitude", where, -90.0)
        lon = _number(s, "longitude", where, -180.0)
        if lat > 90 or lon > 180:
            raise PolicyError(f"{where}latitude/longitude: out of range")
        sites.append(Site(s["name"].strip(), lat, lon))
    if len({site_key(s.name) for s in sites}) != len(sites):
        raise PolicyError("approved_sites: site names must be unique")

    second = raw.get("second_authoriser", {"unapproved_site": True, "under_18": True})
    if not isinstance(second, dict):
        raise PolicyError("second_authoriser: must be an object")
    _unknown(second, _SECOND_KEYS, "second_authoriser.")
    for key in _SECOND_KEYS:
        if not isinstance(second.get(key, True), bool):
            raise PolicyError(f"second_authoriser.{key}: must be true or false")

    extra = _governance(raw)
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    return Policy(
        version=version.strip(), digest=hashlib.sha256(canonical.encode()).hexdigest(), canonical_json=canonical,
        categories=frozenset(CATEGORY_NAMES[c] for c in cats), max_watchlist_size=max_size,
        min_inter_eye_px=e["min_inter_eye_px"], min_sharpness=e["min_sharpness"],
        max_abs_yaw_deg=e["max_abs_yaw_deg"], max_abs_pitch_deg=e["max_abs_pitch_deg"],
        max_image_age_days=e["max_image_age_days"], approved_sites=tuple(sites), several_faces=several,
        dominant_min_size_ratio=dominant["dominant_min_size_ratio"],
        dominant_max_centre_offset=dominant["dominant_max_centre_offset"],
        second_for_unapproved_site=second.get("unapproved_site", True),
        second_for_under_18=second.get("under_18", True), **extra,
    )


_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def _objects(items, key: str, fields: set[str]):
    """(where, item) for each object of the list `items` (policy key `key`), each with only `fields`."""
    if not isinstance(items, list):
        raise PolicyError(f"{key}: must be a list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise PolicyError(f"{key}[{i}]: must be an object")
        where = f"{key}[{i}]."
        _unknown(item, fields, where)
        yield where, item


def _governance(raw: dict) -> dict:
    """The optional #16 sections, validated; keyword arguments of Policy."""
    out: dict = {}
    fields = []
    for where, f in _objects(raw.get("authority_fields", []), "authority_fields", {"name", "label", "required"}):
        if not isinstance(f.get("name"), str) or not _NAME.match(f["name"]):
            raise PolicyError(f"{where}name: must be a lower-case identifier (a-z, 0-9, _)")
        if not isinstance(f.get("required", False), bool):
            raise PolicyError(f"{where}required: must be true or false")
        fields.append(AuthorityField(f["name"], str(f.get("label") or f["name"]), f.get("required", False)))
    if len({f.name for f in fields}) != len(fields):
        raise PolicyError("authority_fields: names must be unique")
    out["authority_fields"] = tuple(fields)

    limits = raw.get("time_limits", {})
    if not isinstance(limits, dict):
        raise PolicyError("time_limits: must be an object")
    _unknown(limits, {"max_deployment_hours", "max_days_ahead"}, "time_limits.")
    for key in ("max_deployment_hours", "max_days_ahead"):
        if key in limits:
            out[key] = _number(limits, key, "time_limits.")

    if "urgent" in raw:
        u = raw["urgent"]
        if not isinstance(u, dict):
            raise PolicyError("urgent: must be an object")
        _unknown(u, {"ranks", "confirm_within_hours"}, "urgent.")
        ranks = u.get("ranks")
        if not isinstance(ranks, list) or not ranks or not all(isinstance(r, str) and r.strip() for r in ranks):
            raise PolicyError("urgent.ranks: must be a non-empty list of ranks")
        hours = _number(u, "confirm_within_hours", "urgent.", 0.001)
        if hours > URGENT_MAX_HOURS:
            raise PolicyError(f"urgent.confirm_within_hours: must be at most {URGENT_MAX_HOURS}")
        out["urgent_ranks"], out["urgent_confirm_hours"] = tuple(r.strip() for r in ranks), hours

    floors = raw.get("threshold_floors", {})
    if not isinstance(floors, dict):
        raise PolicyError("threshold_floors: must be an object (model id -> {floor, reason})")
    parsed = []
    for model_id, f in sorted(floors.items()):
        where = f"threshold_floors.{model_id}."
        if not isinstance(f, dict):
            raise PolicyError(f"threshold_floors.{model_id}: must be an object")
        _unknown(f, {"floor", "reason"}, where)
        value = _number(f, "floor", where, -1e9)
        if not isinstance(f.get("reason"), str) or not f["reason"].strip():
            raise PolicyError(f"{where}reason: required (why this floor)")
        parsed.append((model_id, Floor(value, f["reason"].strip())))
    out["threshold_floors"] = tuple(parsed)

    eq = raw.get("equitability", {})
    if not isinstance(eq, dict):
        raise PolicyError("equitability: must be an object")
    _unknown(eq, {"attributes", "min_count"}, "equitability.")
    attrs = eq.get("attributes", {})
    if not isinstance(attrs, dict):
        raise PolicyError("equitability.attributes: must be an object (name -> list of values)")
    parsed_attrs = []
    for name, values in sorted(attrs.items()):
        if not _NAME.match(name):
            raise PolicyError(f"equitability.attributes.{name}: the name must be a lower-case identifier")
        if (not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values)
                or len(set(values)) != len(values)):
            raise PolicyError(f"equitability.attributes.{name}: must be a non-empty list of distinct values")
        parsed_attrs.append((name, tuple(values)))
    out["equitability"] = tuple(parsed_attrs)
    if "min_count" in eq:
        out["equitability_min_count"] = _number(eq, "min_count", "equitability.", 0, integer=True)

    engines = raw.get("engines", {})
    if not isinstance(engines, dict):
        raise PolicyError("engines: must be an object")
    _unknown(engines, {"false_accept_target"}, "engines.")
    if "false_accept_target" in engines:
        far = _number(engines, "false_accept_target", "engines.", 0.0)
        if not 0 < far <= FALSE_ACCEPT_TARGET_MAX:
            raise PolicyError(f"engines.false_accept_target: must be above 0 and at most {FALSE_ACCEPT_TARGET_MAX:g} "
                              "(a share of impostor pairs, e.g. 1e-5)")
        out["false_accept_target"] = far
    return out


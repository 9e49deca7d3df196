"""The deployment policy: who may be on a watchlist and where it may be used, as code (pure, no I/O).

A policy file (JSON) is loaded and validated when the watchlist service starts; its version and digest are
recorded with every deployment, and each decision below names the rule and the policy version it applied.

    {
      "version": "force-2025-03",                    # required, recorded with each deployment
      "categories": ["wanted-by-court", ...],        # allowed subset of CATEGORY_NAMES
      "max_watchlist_size": 1000,
      "enrollment": {"min_inter_eye_px": 24, "min_sharpness": 40, "max_abs_yaw_deg": 45,
                     "max_abs_pitch_deg": 30, "max_image_age_days": 1825},   # 0 = no age limit
      "approved_sites": [{"name": "Queen Street, Cardiff", "latitude": 51.48, "longitude": -3.17}],
      "second_authoriser": {"unapproved_site": true, "under_18": true}
    }
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

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
             "second_authoriser"}
_ENROLL_KEYS = {"min_inter_eye_px", "min_sharpness", "max_abs_yaw_deg", "max_abs_pitch_deg", "max_image_age_days"}
_SECOND_KEYS = {"unapproved_site", "under_18"}


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
    _unknown(enroll, _ENROLL_KEYS, "enrollment.")
    for key in _ENROLL_KEYS:
        if key not in enroll:
            raise PolicyError(f"enrollment.{key}: required")
    e = {k: _number(enroll, k, "enrollment.", integer=(k == "max_image_age_days")) for k in _ENROLL_KEYS}
    for key in ("max_abs_yaw_deg", "max_abs_pitch_deg"):
        if e[key] > 90:
            raise PolicyError(f"enrollment.{key}: must be at most 90")

    sites_raw = raw["approved_sites"]
    if not isinstance(sites_raw, list):
        raise PolicyError("approved_sites: must be a list")
    sites = []
    for i, s in enumerate(sites_raw):
        where = f"approved_sites[{i}]."
        if not isinstance(s, dict):
            raise PolicyError(f"approved_sites[{i}]: must be an object")
        _unknown(s, {"name", "latitude", "longitude"}, where)
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

    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    return Policy(
        version=version.strip(), digest=hashlib.sha256(canonical.encode()).hexdigest(), canonical_json=canonical,
        categories=frozenset(CATEGORY_NAMES[c] for c in cats), max_watchlist_size=max_size,
        min_inter_eye_px=e["min_inter_eye_px"], min_sharpness=e["min_sharpness"],
        max_abs_yaw_deg=e["max_abs_yaw_deg"], max_abs_pitch_deg=e["max_abs_pitch_deg"],
        max_image_age_days=e["max_image_age_days"], approved_sites=tuple(sites),
        second_for_unapproved_site=second.get("unapproved_site", True),
        second_for_under_18=second.get("under_18", True),
    )


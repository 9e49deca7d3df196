"""The authorisation guard's records: people's calls one by one, services' allowed calls as periodic summaries."""

from __future__ import annotations

from lfr.runtime.config import Config
from lfr.runtime.security import Guard, Identity


class Ctx:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"


def test_service_calls_are_summarised_and_everything_else_recorded_per_call():
    guard = Guard(Config(service="watchlist", insecure=True))
    records: list[dict] = []
    guard.publish = lambda **r: records.append(r)
    match = Identity("match", frozenset({"service"}), "certificate")
    officer = Identity("pc 1", frozenset({"engagement_officer"}), "token:k1")
    search = "/lfr.watchlist.v1.WatchlistService/Search"
    for _ in range(250):  # a match search for every frame with faces
        guard.record(search, Ctx(), match, "OK", "")
    guard.record("/lfr.watchlist.v1.WatchlistService/ListDeployments", Ctx(), officer, "OK", "")
    guard.record("/lfr.match.v1.MatchService/Adjudicate", Ctx(), match, "PERMISSION_DENIED", "no role")
    assert [(r["ident"].subject, r["decision"]) for r in records] == [("pc 1", "ALLOWED"), ("match", "DENIED")]
    guard.flush()
    summary = records[-1]
    assert (summary["ident"].subject, summary["method"], summary["count"]) == ("match", search, 250)
    assert summary["since_ns"] > 0 and summary["decision"] == "ALLOWED"
    guard.flush()  # nothing new: no empty summaries
    assert len(records) == 3

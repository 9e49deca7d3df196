"""The soak's arithmetic: histogram quantiles, counter resets, and the growth / creep verdict."""

from __future__ import annotations

from lfr.bench.soak import Soak, delta, quantile

INF = float("inf")


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile():
    b = {0.1: 0.0, 0.2: 50.0, 0.5: 100.0, INF: 100.0}
    assert quantile(b, 0.5) == 0.2
    assert abs(quantile(b, 0.75) - 0.35) < 1e-9
    assert quantile({0.1: 0.0, INF: 0.0}, 0.95) is None
    assert quantile({0.1: 0.0, 2.0: 0.0, INF: 10.0}, 0.95) == 2.0  # beyond the last bound: that bound


def test_a_counter_reset_counts_from_zero():
    assert delta({1.0: 10.0}, {1.0: 15.0}) == {1.0: 5.0}
    assert delta({1.0: 10.0}, {1.0: 3.0}) == {1.0: 3.0}


class _System:
    def endpoints(self):
        return {"metrics": {}}


def _soak(rss_end: float, creep: bool) -> dict:
    s = Soak(_System(), every_s=60, window_s=300)
    for k in range(11):  # two windows of 5 minutes, a sample a minute
        t = 60.0 * k
        late = k > 5
        rss = rss_end if late else 500.0
        n = 100.0 * k
        if creep and late:  # the later faces all take 0.5-2 s
            hist = {0.1: 250.0, 0.2: 500.0, 2.0: n, INF: n}
        else:
            hist = {0.1: n / 2, 0.2: n, 2.0: n, INF: n}
        s.samples.append({"t": t, "procs": {"match": {"pid": 1, "rss_mib": rss, "fds": 20}},
                          "disposal": hist, "detect": hist, "processed": n, "dropped": 0.0})
    return s.report()


def test_steady_memory_and_latency_pass():
    r = _soak(rss_end=510.0, creep=False)
    assert r["ok"], r["problems"]
    assert len(r["windows"]) == 2


def test_a_stalled_pipeline_fails():
    s = Soak(_System(), every_s=60, window_s=300)
    for k in range(11):  # frames processed in the first window, none after (every frame dropped as stale)
        n = 100.0 * min(k, 5)
        hist = {0.1: n / 2, 0.2: n, INF: n}
        s.samples.append({"t": 60.0 * k, "procs": {}, "disposal": hist, "detect": hist, "processed": n,
                          "dropped": 100.0 * max(0, k - 5)})
    r = s.report()
    assert not r["ok"] and "throughput collapse" in r["problems"][0]


def test_growth_and_creep_fail():
    r = _soak(rss_end=800.0, creep=False)
    assert not r["ok"] and "match: RSS" in r["problems"][0]
    r = _soak(rss_end=500.0, creep=True)
    assert not r["ok"] and "latency creep" in r["problems"][0]

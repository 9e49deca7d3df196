"""Soak measurements for `lfr bench pipeline --minutes M`: every process's memory and open files sampled over
time, latency percentiles and drops per window, and the verdict on unbounded growth and latency creep.

Latency is the capture-to-decision time of every face that matched nobody (match's disposal histogram: the
whole pipeline, ingest to match), and detection's batch time; percentiles come from the histograms' bucket
counts within each window, interpolated inside a bucket as Prometheus's histogram_quantile does."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

# Verdict thresholds (first window against last): a process "grows" when its median RSS rose by more than
# both GROWTH_MIB and GROWTH_SHARE; latency "creeps" when the last window's p95 exceeds the first's by CREEP_SHARE
# and CREEP_MS; open files grow when the count rose by more than FDS_MORE; and any window processing under
# THROUGHPUT_SHARE of the first window's frames is a stall.
GROWTH_MIB = 64.0
GROWTH_SHARE = 0.25
CREEP_SHARE = 0.5
CREEP_MS = 50.0
FDS_MORE = 32
THROUGHPUT_SHARE = 0.5  # a later window processing under half the first window's frames fails the soak


def proc_sample(pid: int) -> tuple[float, int] | None:
    """(RSS MiB, open file descriptors) of a process, None when it is gone."""
    try:
        rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None
    return rss_kb / 1024, fds


def histogram(url: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts {upper bound: count} of a histogram summed over its labels (+Inf as inf)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == f"{name}_bucket":
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
    return out


def counter(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name)


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile (seconds) of a histogram's bucket counts; None without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if b == float("inf"):
                return lower  # beyond the last finite bound: report that bound (a floor)
            share = (rank - below) / max(buckets[b] - below, 1e-12)
            return lower + (b - lower) * share
        lower, below = b, buckets[b]
    return lower


def delta(a: dict[float, float], b: dict[float, float]) -> dict[float, float]:
    """b - a per bucket; a counter reset (a restarted service) counts b from zero."""
    if any(b.get(k, 0.0) < v for k, v in a.items()):
        return dict(b)
    return {k: v - a.get(k, 0.0) for k, v in b.items()}


class Soak:
    """Samples a running EmbeddedSystem in a thread every `every_s` seconds until stop()."""

    def __init__(self, system, every_s: float = 15.0, window_s: float = 300.0):
        self.system, self.every_s, self.window_s = system, every_s, window_s
        self.metrics = system.endpoints()["metrics"]
        self.samples: list[dict] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak", daemon=True)

    def start(self) -> Soak:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        procs = {**self.system.pids(), "bench_client": os.getpid()}
        s: dict = {"t": time.monotonic() - self.t0, "procs": {}}
        for name, pid in procs.items():
            got = proc_sample(pid)
            if got is not None:
                s["procs"][name] = {"pid": pid, "rss_mib": got[0], "fds": got[1]}
        try:
            s["disposal"] = histogram(self.metrics["match"], "lfr_nonmatch_disposal_seconds")
            s["detect"] = histogram(self.metrics["detection"], "lfr_stage_seconds")
            s["processed"] = counter(self.metrics["detection"], "lfr_items_processed_total")
            s["dropped"] = sum(counter(self.metrics[n], "lfr_items_dropped_total")
                               for n in ("detection", "embedding", "match"))
        except OSError:  # a service being restarted: this sample has no metrics
            pass
        self.samples.append(s)

    # Report --------------------------------------------------------------------------------------------
    def windows(self) -> list[dict]:
        out = []
        end = self.samples[-1]["t"] if self.samples else 0.0
        n = max(1, int(end // self.window_s + (1 if end % self.window_s > self.every_s else 0)))
        for w in range(n):
            lo, hi = w * self.window_s, min((w + 1) * self.window_s, end)
            inside = [s for s in self.samples if lo <= s["t"] <= hi and "disposal" in s]
            if len(inside) < 2:
                continue
            a, b = inside[0], inside[-1]
            disp, det = delta(a["disposal"], b["disposal"]), delta(a["detect"], b["detect"])

            def ms(v):
                return None if v is None else round(1000 * v, 1)

            procs = {}
            for name in b["procs"]:
                rss = sorted(s["procs"][name]["rss_mib"] for s in inside if name in s["procs"])
                procs[name] = {"rss_mib_median": round(rss[len(rss) // 2], 1), "fds": b["procs"][name]["fds"]}
            out.append({
                "from_min": round(lo / 60, 1), "to_min": round(hi / 60, 1),
                "faces_disposed": int(max(disp.values(), default=0)),
                "disposal_ms": {"p50": ms(quantile(disp, 0.5)), "p95": ms(quantile(disp, 0.95))},
                "detect_batch_ms_p95": ms(quantile(det, 0.95)),
                "frames_processed": int(max(0.0, b["processed"] - a["processed"])),
                "drops": int(max(0.0, b["dropped"] - a["dropped"])),
                "processes": procs})
        return out

    def report(self) -> dict:
        wins = self.windows()
        first, last = (wins[0], wins[-1]) if wins else ({}, {})
        names = sorted(set().union(*(s["procs"] for s in self.samples))) if self.samples else []
        per_process, problems = {}, []
        for name in names:
            seen = [s["procs"][name] for s in self.samples if name in s["procs"]]
            start, end = seen[0], seen[-1]
            row = {"rss_mib_start": round(start["rss_mib"], 1), "rss_mib_end": round(end["rss_mib"], 1),
                   "rss_mib_max": round(max(p["rss_mib"] for p in seen), 1), "fds_start": start["fds"],
                   "fds_end": end["fds"], "pids": sorted({p["pid"] for p in seen})}
            if len(wins) >= 2 and name in first.get("processes", {}) and name in last.get("processes", {}):
                a = first["processes"][name]["rss_mib_median"]
                b = last["processes"][name]["rss_mib_median"]
                row["rss_growth_mib"] = round(b - a, 1)
                if b - a > GROWTH_MIB and b > a * (1 + GROWTH_SHARE):
                    problems.append(f"{name}: RSS {a:.0f} -> {b:.0f} MiB (first to last window)")
                fa, fb = first["processes"][name]["fds"], last["processes"][name]["fds"]
                if fb - fa > FDS_MORE:
                    problems.append(f"{name}: open files {fa} -> {fb}")
            per_process[name] = row
        for w in wins[1:]:  # the pipeline must keep deciding: a window that processes far fewer frames than the
            # first, at the same input rate, is a stall (the stage that dropped every frame after one slow batch)
            if w["frames_processed"] < THROUGHPUT_SHARE * first["frames_processed"]:
                problems.append(f"throughput collapse: {w['frames_processed']} frames processed in minutes "
                                f"{w['from_min']}-{w['to_min']} against {first['frames_processed']} in the first "
                                f"window ({w['drops']} dropped)")
        if len(wins) >= 2:
            p0, p1 = first["disposal_ms"]["p95"], last["disposal_ms"]["p95"]
            if p0 is not None and p1 is not None and p1 > p0 * (1 + CREEP_SHARE) and p1 - p0 > CREEP_MS:
                problems.append(f"latency creep: disposal p95 {p0} -> {p1} ms (first to last window)")
        return {"minutes": round((self.samples[-1]["t"] if self.samples else 0) / 60, 1),
                "sample_s": self.every_s, "window_min": self.window_s / 60, "processes": per_process,
                "windows": wins, "problems": problems, "ok": not problems and len(wins) >= 1,
                "thresholds": {"rss_growth": f"> {GROWTH_MIB:g} MiB and > {GROWTH_SHARE:.0%}",
                               "throughput": f"a window under {THROUGHPUT_SHARE:.0%} of the first's frames",
                               "latency_creep": f"p95 > first window's by {CREEP_SHARE:.0%} and {CREEP_MS:g} ms",
                               "fds_growth": f"> {FDS_MORE}"}}

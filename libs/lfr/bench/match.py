"""``lfr bench match``: per-face decision time at watchlists of 100, 1,000 and 10,000 entries, two ways, in the
same run and on the same vectors:

- ``grpc_search``: what match does today for every frame with faces: the watchlist service's gRPC ``Search``
  (one face, k = 1) on a running embedded system, called as the match service (its certificate);
- ``in_memory``: :class:`lfr.models.scoring.ExactIndex` holding the deployment's vectors in the calling
  process (exact search by the same recipe): what a match replica does with the vectors in memory, with its BLAS on
  one thread as in the match service (``OPENBLAS_NUM_THREADS=1``, see services/match/__main__.py).

The watchlist is filled with synthetic unit vectors of the live model's components (one per entry, written
into the watchlist service's Qdrant while it is stopped: enrolling 10,000 people through detection is not
what is measured here). Half the probes are a stored vector plus noise (a listed person), half are fresh
vectors (a stranger). ``agree`` is the fraction of probes whose top entry and score (within 1e-4) are the
same both ways: the in-memory decision is the live decision. Times are per face, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="100,1000,10000", help="watchlist sizes (default 100,1000,10000)")
    p.add_argument("--probes", type=int, default=300, help="faces per size (default 300)")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--json", action="store_true", help="one-line JSON")


def _pct(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50": round(float(np.percentile(a, 50)), 4), "p99": round(float(np.percentile(a, 99)), 4),
            "mean": round(float(a.mean()), 4)}


def _unit(rng, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def run(args) -> dict:
    from qdrant_client import models

    from lfr.cli.client import Clients
    from lfr.cli.live import create_deployment
    from lfr.models import scoring
    from lfr.pb import common_pb2, embedding_pb2, watchlist_pb2, watchlist_pb2_grpc
    from lfr.runtime.access import Access
    from lfr.runtime.embedded import EmbeddedSystem
    from lfr.runtime.security import ROLES
    from lfr.vectorindex import VectorIndex, collection_name

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rng = np.random.default_rng(args.seed)
    out: dict = {"benchmark": "match", "probes": args.probes, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="lfr-bench-match-") as tmp:
        with EmbeddedSystem(Path(tmp) / "state", console=False) as system:
            people = Clients.connect(system.endpoints(), access=system.access(user="bench", follow_actor=True,
                                                                               roles=sorted(ROLES)))
            model = people.embedding.GetModel(embedding_pb2.GetModelRequest())
            recipe = scoring.Recipe.from_description(model)
            out["model"] = recipe.model_id
            d = create_deployment(people, "bench-match", ["cam-1"])
            # the watchlist, asked as match asks it: the match service's certificate, no person's token
            tls = system.state_dir / "security" / "tls"
            as_match = Access(tls, cert="match").channel(system.endpoint("watchlist"))
            search = watchlist_pb2_grpc.WatchlistServiceStub(as_match).Search
            index = scoring.ExactIndex(recipe)
            stored: dict[str, list[np.ndarray]] = {c.model_id: [] for c in model.components}
            for size in sizes:
                grow = size - len(index)
                if grow > 0:
                    system.stop_service("watchlist")
                    new = {c.model_id: _unit(rng, grow, c.dim) for c in model.components}
                    vi = VectorIndex(system.state_dir / "qdrant")
                    try:
                        for c in model.components:
                            name = collection_name(c.model_id, c.model_version)
                            vi.ensure_collection(name, c.dim, c.metric)
                            for s0 in range(0, grow, 1000):
                                vi.client.upsert(name, points=[models.PointStruct(
                                    id=str(uuid.uuid4()), vector=new[c.model_id][j].tolist(),
                                    payload={"deployment_id": d.id, "entry_id": f"b{len(index) + j:06d}",
                                             "subject_ref": f"b{len(index) + j:06d}", "category": 1})
                                    for j in range(s0, min(grow, s0 + 1000))], wait=True)
                    finally:
                        vi.close()
                    for j in range(grow):
                        index.add(f"b{len(index):06d}", {c: new[c][j] for c in new})
                    for c in new:
                        stored[c].append(new[c])
                    system.start_service("watchlist")
                    system.wait_healthy(["watchlist"], 180)
                allv = {c: np.concatenate(v) for c, v in stored.items()}
                half = args.probes // 2
                pick = rng.integers(0, size, half)
                near = {c: allv[c][pick] + rng.normal(scale=0.02, size=(half, allv[c].shape[1])) for c in allv}
                probes = {c: np.concatenate([near[c] / np.linalg.norm(near[c], axis=1, keepdims=True),
                                             _unit(rng, args.probes - half, allv[c].shape[1])])
                          for c in allv}  # unit vectors, as the embedder gives
                grpc_ms, mem_ms, agree = [], [], 0
                for i in range(args.probes):
                    req = watchlist_pb2.SearchRequest(deployment_id=d.id, k=1, probes=[watchlist_pb2.Probe(vectors=[
                        common_pb2.Vector(model_id=c.model_id, model_version=c.model_version,
                                          values=probes[c.model_id][i].astype(np.float32).tolist())
                        for c in model.components])])
                    t0 = time.perf_counter()
                    resp = search(req, timeout=10)
                    grpc_ms.append((time.perf_counter() - t0) * 1000)
                    one = {c: probes[c][i].astype(np.float32) for c in probes}
                    with threadpool_limits(limits=1, user_api="blas"):  # as the match service runs it
                        t0 = time.perf_counter()
                        top = index.search(one, 1)[0]
                        mem_ms.append((time.perf_counter() - t0) * 1000)
                    g = resp.results[0].candidates[0] if resp.results[0].candidates else None
                    agree += bool(g and top and g.entry_id == top[0][0] and abs(g.score - top[0][1]) < 1e-4)
                out["sizes"][str(size)] = {
                    "grpc_search_ms": _pct(grpc_ms), "in_memory_ms": _pct(mem_ms),
                    "speedup_p50": round(float(np.percentile(grpc_ms, 50) / np.percentile(mem_ms, 50)), 1),
                    "agree": agree / args.probes,
                    "in_memory_p99_under_2ms": bool(np.percentile(mem_ms, 99) < 2.0)}
            people.close()
    out["ok"] = all(v["agree"] == 1.0 for v in out["sizes"].values())
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return out

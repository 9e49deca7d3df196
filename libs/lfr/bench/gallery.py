"""``lfr bench gallery``: the gallery index at scale: insert rate, top-10 search latency, recall against exact
search, memory.

It drives the gallery index the identification service uses (:class:`lfr.galleryindex.EmbeddedIndex`: usearch
HNSW over a durable float32 file, exact re-scoring), in a temporary folder.

Vectors. Scale needs more faces than any data set here, so the gallery is filled with synthetic vectors drawn
from a Gaussian with the mean and covariance of real embeddings of the chosen model (LFW images embedded by the
library; isotropic if ``--no-real``), L2-normalised for cosine models. A fitted Gaussian has no identity
clusters, which makes nearest-neighbour search harder than on real faces: a conservative choice. The real LFW
vectors go in as well (open-set split: the first image of each person with 2+ images, and every image of
people with one), at random positions among the synthetic ones.

Queries, one per call, top 10:

- ``recall_at_10`` (the headline): real LFW mated probes (other images of the people in the gallery, never in
  it), recall of the index's top 10 against exact brute-force search over the same float32 vectors;
  ``rank1_agreement``: how often the index's rank 1 is the exact rank 1;
- ``recall_at_10_synthetic``: fresh draws from the fitted Gaussian (faces of nobody in particular; the hardest
  case, since every neighbour is about as far as the next).

``search_ms`` is over all queries. ``insert_per_s`` counts durable appends plus graph insertion (the index is
searchable as it grows: nothing to optimise afterwards), in batches of ``--batch`` added on ``--threads`` threads;
``insert_per_cpu_s`` is the same per CPU-second of the process (all threads), the figure to compare on a shared
machine; ``save_s`` is the time to save the graph for a fast
restart. ``rss_mb`` is the process's peak resident memory (vector file pages included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=100_000, help="vectors in the gallery (default 100000)")
    parser.add_argument("--queries", type=int, default=1000, help="queries of each kind (default 1000)")
    parser.add_argument("--k", type=int, default=10, help="top k (default 10)")
    parser.add_argument("--model", default="sface", help="model whose real vectors shape the synthetic ones")
    parser.add_argument("--data", type=Path, default=None, help="LFW-layout folder for the real vectors "
                        "(default: the shared lfw-dev)")
    parser.add_argument("--no-real", action="store_true", help="synthetic isotropic vectors only (no LFW)")
    parser.add_argument("--real-vectors", type=Path, default=None,
                        help="cache file (.npz) for the real vectors: read if present, else written")
    parser.add_argument("--connectivity", type=int, default=48, help="HNSW graph degree (default 48, as "
                        "LFR_GALLERY_CONNECTIVITY)")
    parser.add_argument("--expansion-add", type=int, default=128, help="HNSW candidates while adding (128)")
    parser.add_argument("--ef", type=int, default=1536, help="HNSW candidates while searching (default 1536, as "
                        "LFR_GALLERY_EF)")
    parser.add_argument("--ef-sweep", default="", help="also measure these search efs on the same index, e.g. "
                        "512,1024,2048 (recall and latency of the real queries for each)")
    parser.add_argument("--batch", type=int, default=10_000, help="vectors per insert call (default 10000)")
    parser.add_argument("--threads", type=int, default=0, help="threads adding each batch to the graph (default 0: "
                        "one per core, as the identification service does)")
    parser.add_argument("--dir", type=Path, default=None, help="index folder (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(f"[bench gallery] {msg}", file=sys.stderr, flush=True)


def real_vectors(args) -> tuple[np.ndarray, np.ndarray, str, int]:
    """(gallery vectors, mated probe vectors, metric, dim) of real LFW images, embedded by the library."""
    from lfr.bench import metrics
    from lfr.bench.lfw import list_identities
    from lfr.bench.pipeline import OursPipeline, data_dir, set_threads
    from lfr.models.engines import MODELS, resolve_model_id

    mid = resolve_model_id(args.model)
    if mid not in MODELS:
        raise SystemExit(f"bench gallery measures one component model (sface or dlib), not {mid}")
    info = MODELS[mid]
    if args.real_vectors and args.real_vectors.is_file():
        z = np.load(args.real_vectors)
        return z["gallery"], z["probes"], info.metric, info.dim
    set_threads(args.threads or os.cpu_count() or 1)
    root = data_dir(argparse.Namespace(data=args.data))
    split = metrics.open_set_split(list_identities(root))
    pipe = OursPipeline(mid, quiet=args.quiet)
    _log(args, f"embedding {len(split.gallery) + len(split.nonmated) + len(split.mated)} LFW images with {mid}")
    emb = pipe.embed(root, split.gallery + split.nonmated + split.mated)
    gallery = emb.get(split.gallery + split.nonmated)[mid]
    probes = emb.get(split.mated)[mid]
    if args.real_vectors:
        args.real_vectors.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.real_vectors, gallery=gallery, probes=probes)
    return gallery, probes, info.metric, info.dim


class Synthetic:
    """Draws from N(mean, cov) fitted to real vectors (or N(0, I)); unit length for cosine models."""

    def __init__(self, fit: np.ndarray | None, dim: int, metric: str, seed: int):
        self.rng = np.random.default_rng(seed)
        self.dim, self.metric = dim, metric
        if fit is not None and len(fit) > dim:
            x = np.asarray(fit, dtype=np.float64)
            self.mean = x.mean(0)
            self.chol = np.linalg.cholesky(np.cov(x.T) + 1e-9 * np.eye(dim))
        else:
            self.mean, self.chol = np.zeros(dim), np.eye(dim)

    def draw(self, n: int) -> np.ndarray:
        x = self.mean + self.rng.standard_normal((n, self.dim)) @ self.chol.T
        if self.metric == "cosine":
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


def _timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    ids, lat = [], []
    for q in queries:
        t = time.perf_counter()
        found, _ = index.search(q[None], k)
        lat.append((time.perf_counter() - t) * 1000.0)
        ids.append(found[0])
    return np.array(ids), lat


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(set(a[a >= 0].tolist()) & set(b[b >= 0].tolist())) / max(1, (b >= 0).sum())
            for a, b in zip(found, exact, strict=True)]
    return float(np.mean(hits)) if hits else 0.0


def run(args) -> dict:
    from lfr.galleryindex import EmbeddedIndex, IndexParams

    t_start = time.perf_counter()
    if args.no_real:
        real_g, real_p, metric, dim = None, None, "cosine", 128
    else:
        real_g, real_p, metric, dim = real_vectors(args)
    fit = None if real_g is None else np.concatenate([real_g, real_p])
    synth = Synthetic(fit, dim, metric, args.seed)
    n_real = 0 if real_g is None else min(len(real_g), args.size)
    rng = np.random.default_rng(args.seed + 1)
    real_pos = np.sort(rng.choice(args.size, n_real, replace=False)) if n_real else np.zeros(0, np.int64)

    folder = args.dir or Path(tempfile.mkdtemp(prefix="lfr-bench-gallery-"))
    if args.dir and folder.exists():
        shutil.rmtree(folder)
    params = IndexParams(connectivity=args.connectivity, expansion_add=args.expansion_add,
                         expansion_search=args.ef, threads=args.threads)
    try:
        index = EmbeddedIndex(folder, dim, metric, params)
        _log(args, f"inserting {args.size} vectors in batches of {args.batch}")
        insert_s, insert_cpu_s, last_log = 0.0, 0.0, time.monotonic()
        for start in range(0, args.size, args.batch):
            n = min(args.batch, args.size - start)
            block = synth.draw(n)
            mask = (real_pos >= start) & (real_pos < start + n)
            if mask.any():
                which = np.flatnonzero(mask)
                block[real_pos[which] - start] = real_g[which]
            t, c = time.perf_counter(), time.process_time()
            index.add(np.arange(start, start + n), block)
            insert_s += time.perf_counter() - t
            insert_cpu_s += time.process_time() - c  # every thread of the process
            if time.monotonic() - last_log > 30:
                last_log = time.monotonic()
                _log(args, f"{start + n}/{args.size} inserted, {(start + n) / insert_s:.0f}/s")
        t = time.perf_counter()
        index.save()
        save_s = time.perf_counter() - t

        result: dict = {
            "size": args.size, "dim": dim, "metric": metric, "model": args.model if real_g is not None else None,
            "real_vectors_in_gallery": int(n_real),
            "index": {"kind": "usearch HNSW (i8 graph for cosine, f16 for euclidean) + exact float32 re-scoring",
                      "connectivity": args.connectivity, "expansion_add": args.expansion_add, "ef": args.ef},
            "insert_per_s": round(args.size / insert_s, 1), "insert_s": round(insert_s, 1),
            "insert_cpu_s": round(insert_cpu_s, 1), "insert_per_cpu_s": round(args.size / insert_cpu_s, 1),
            "threads": params.add_threads(),
            "save_s": round(save_s, 2),
        }
        kinds = {}
        if real_p is not None:
            sel = rng.choice(len(real_p), min(args.queries, len(real_p)), replace=False)
            kinds["real"] = real_p[np.sort(sel)].astype(np.float32)
        kinds["synthetic"] = synth.draw(args.queries)
        latencies: list[float] = []
        for name, queries in kinds.items():
            _log(args, f"{len(queries)} {name} queries: index, then exact search")
            index.search(queries[:5], args.k)  # warm the pages the first queries touch
            found, lat = _timed_search(index, queries, args.k)
            latencies += lat
            exact, _ = index.exact_search(queries, args.k)
            key = "recall_at_10" if name == "real" or real_p is None else "recall_at_10_synthetic"
            result[key if args.k == 10 else key.replace("10", str(args.k))] = round(_recall(found, exact), 4)
            if name == "real" or real_p is None:
                result["rank1_agreement"] = round(float(np.mean(found[:, 0] == exact[:, 0])), 4)
                result["queries"] = len(queries)
            result[f"search_ms_{name}"] = {"p50": round(float(np.percentile(lat, 50)), 3),
                                           "p99": round(float(np.percentile(lat, 99)), 3)}
        result["search_ms"] = {"p50": round(float(np.percentile(latencies, 50)), 3),
                               "p99": round(float(np.percentile(latencies, 99)), 3)}
        sweep = [int(x) for x in args.ef_sweep.split(",") if x.strip()]
        if sweep:
            queries = kinds.get("real", kinds["synthetic"])
            exact, _ = index.exact_search(queries, args.k)
            result["ef_sweep"] = []
            for ef in sweep:
                index.set_expansion_search(ef)
                found, lat = _timed_search(index, queries, args.k)
                result["ef_sweep"].append({
                    "ef": ef, "recall_at_10": round(_recall(found, exact), 4),
                    "rank1_agreement": round(float(np.mean(found[:, 0] == exact[:, 0])), 4),
                    "search_ms": {"p50": round(float(np.percentile(lat, 50)), 3),
                                  "p99": round(float(np.percentile(lat, 99)), 3)}})
                _log(args, f"ef {ef}: {result['ef_sweep'][-1]}")
            index.set_expansion_search(args.ef)
        result["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        result["index_memory_mb"] = round(index.memory_bytes() / 2**20, 1)
        result["vector_file_mb"] = round(index.rows * index.row_bytes / 2**20, 1)
        result["machine"] = {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)}
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        index.close()
        return result
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lfr bench gallery", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(run(args), indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

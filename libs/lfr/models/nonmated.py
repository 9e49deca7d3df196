"""The expected false-alert rate of a watchlist, from a model's measured non-mated score distribution.

A table per model is shipped as package data (``nonmated_<model id>.json``): for a grid of thresholds, the share
of non-mated comparisons (two different people) whose score is at or above it, measured on development images
with the model as the platform runs it (detect -> align -> embed -> score). Built by

    python -m lfr.models.nonmated --data ../shared/data/lfw-dev [--model sface-2021dec] [--people 1500]

(one image of each person, every pair of different people) which writes the JSON next to this module.

A face seen by a deployment is compared with every entry of its watchlist; it raises a false alert when any of
the N non-mated scores reaches the threshold. With a per-comparison rate r (the table's, at the threshold), the
expected false alerts per 10,000 faces are 10,000 x (1 - (1 - r)^N) (comparisons taken as independent). Reading
the table needs no model: the watchlist service shows the figure at authorisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

PER = 10_000


@dataclass(frozen=True)
class Table:
    model_id: str
    model_version: str
    dataset: str
    command: str
    images: int
    pairs: int
    thresholds: tuple[float, ...]  # ascending
    rates: tuple[float, ...]  # share of non-mated pairs with score >= threshold

    @property
    def name(self) -> str:
        return (f"nonmated_{self.model_id}.json: {self.pairs:,} non-mated pairs of {self.images:,} {self.dataset} "
                f"images")

    def rate_at(self, threshold: float) -> float:
        """The share of non-mated comparisons at or above `threshold`: the table's value at the largest grid
        threshold not above it (so never an underestimate); below the grid, 1."""
        rate = 1.0
        for t, r in zip(self.thresholds, self.rates, strict=True):
            if t > threshold:
                break
            rate = r
        return rate


def expected_per_10k(rate: float, list_size: int) -> float:
    """Expected false alerts per 10,000 faces for a watchlist of `list_size` entries at a per-comparison rate."""
    return PER * (1.0 - (1.0 - rate) ** max(0, list_size))


def parse_table(text: str) -> Table:
    raw = json.loads(text)
    t = Table(raw["model_id"], raw["model_version"], raw["dataset"], raw["command"], int(raw["images"]),
              int(raw["pairs"]), tuple(float(x) for x in raw["thresholds"]), tuple(float(x) for x in raw["rates"]))
    if len(t.thresholds) != len(t.rates) or list(t.thresholds) != sorted(t.thresholds):
        raise ValueError("thresholds must be ascending, one rate each")
    return t


@lru_cache(maxsize=8)
def load_table(model_id: str) -> Table | None:
    """The shipped table of a model, or None when it has none."""
    try:
        text = (files("lfr.models") / f"nonmated_{model_id}.json").read_text()
    except (FileNotFoundError, OSError):
        return None
    return parse_table(text)


def expected(model_id: str, threshold: float, list_size: int) -> tuple[float, float, str]:
    """(expected false alerts per 10,000 faces, per-comparison rate, the table's name); (-1, 0, '') without a
    table."""
    table = load_table(model_id)
    if table is None:
        return -1.0, 0.0, ""
    rate = table.rate_at(threshold)
    return expected_per_10k(rate, list_size), rate, table.name


# Building a table (needs the model) ----------------------------------------------------------------------
def nonmated_scores(data: Path, model_id: str | None, people: int):
    import numpy as np
    from PIL import Image

    from lfr.models.engines import central_face, get_engine

    engine = get_engine(model_id)
    vectors: list[dict] = []
    for person in sorted(p for p in data.iterdir() if p.is_dir()):
        if len(vectors) >= people:
            break
        imgs = sorted(person.glob("*.jpg"))
        if not imgs:
            continue
        img = np.asarray(Image.open(imgs[0]).convert("RGB"))
        face = central_face(img, engine.detect([img])[0])
        if face is not None:
            vectors.append(engine.embed_faces(img, [face]))
    stacked = {c: np.concatenate([v[c] for v in vectors]) for c in vectors[0]}
    matrix = np.asarray(engine.score(stacked, stacked))  # (P, P): every image against every other
    iu = np.triu_indices(len(vectors), k=1)  # one image per person: every pair is non-mated
    return engine, matrix[iu], len(vectors)


def build(data: Path, model_id: str | None, people: int, steps: int) -> dict:
    import numpy as np

    engine, scores, n = nonmated_scores(data, model_id, people)
    scores = np.sort(scores)
    lo, hi = float(np.floor(scores[0] * 100) / 100), float(np.ceil(scores[-1] * 100) / 100)
    grid = np.round(np.linspace(lo, hi, steps), 4)
    ge = len(scores) - np.searchsorted(scores, grid, side="left")  # scores >= t
    return {
        "model_id": engine.info.model_id, "model_version": engine.info.version, "dataset": data.name,
        "command": f"python -m lfr.models.nonmated --data {data.name} --people {people} --steps {steps}",
        "images": n, "pairs": int(len(scores)), "built": time.strftime("%Y-%m-%d", time.gmtime()),
        "score_max": float(scores[-1]),
        "thresholds": [float(x) for x in grid], "rates": [float(c) / len(scores) for c in ge],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lfr.models.nonmated", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a folder of <person>/<image>.jpg (LFW layout)")
    p.add_argument("--model", default=None, help="model id (default: the platform's default model)")
    p.add_argument("--people", type=int, default=1500, help="one image of each of at most N people")
    p.add_argument("--steps", type=int, default=401, help="thresholds in the grid")
    p.add_argument("--out", default="", help="default: nonmated_<model id>.json beside this module")
    args = p.parse_args(argv)
    table = build(Path(args.data), args.model, args.people, args.steps)
    out = Path(args.out) if args.out else Path(__file__).with_name(f"nonmated_{table['model_id']}.json")
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps({k: v for k, v in table.items() if k not in ("thresholds", "rates")} | {"out": str(out)}))


if __name__ == "__main__":
    main(sys.argv[1:])

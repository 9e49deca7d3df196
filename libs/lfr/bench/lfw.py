"""LFW-layout data folders and pair files.

Layout: ``<root>/<Name>/<Name>_NNNN.jpg`` (1-based, 4-digit image numbers).

Pair files (tab- or space-separated):

- View 1 (``pairsDevTrain.txt``, ``pairsDevTest.txt``): first line = N; then N matched lines ``name i j``
  and N mismatched lines ``name1 i name2 j``. One set.
- View 2 (``pairs.txt``): first line ``S N`` (``10 300``); then S sets, each N matched + N mismatched lines.
  Each set is one fold of the standard 10-fold protocol.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class LfwFormatError(ValueError):
    """A pair file or data folder does not follow the LFW layout."""


@dataclass(frozen=True)
class Pair:
    a: str  # image path relative to the data root, e.g. "Aaron_Peirsol/Aaron_Peirsol_0001.jpg"
    b: str
    same: bool
    fold: int  # set index in the file (0 for View 1 files)


@dataclass(frozen=True)
class PairFile:
    path: Path
    pairs: list[Pair]
    n_sets: int  # 1 for View 1 files, 10 for View 2

    @property
    def is_tenfold(self) -> bool:
        return self.n_sets > 1


def image_rel(name: str, index: int) -> str:
    return f"{name}/{name}_{int(index):04d}.jpg"


def _fields(line: str) -> list[str]:
    return line.split("\t") if "\t" in line else line.split()


def parse_pairs(text: str, path: Path | str = "<pairs>") -> PairFile:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise LfwFormatError(f"{path}: empty pair file")
    head = _fields(lines[0])
    try:
        nums = [int(x) for x in head]
    except ValueError:
        raise LfwFormatError(f"{path}: first line must be 'N' or 'SETS N', got {lines[0]!r}") from None
    if len(nums) == 1:
        n_sets, per = 1, nums[0]
    elif len(nums) == 2:
        n_sets, per = nums
    else:
        raise LfwFormatError(f"{path}: first line must be 'N' or 'SETS N', got {lines[0]!r}")
    body = lines[1:]
    if len(body) != n_sets * 2 * per:
        raise LfwFormatError(f"{path}: header promises {n_sets}x(2x{per}) pairs, file has {len(body)} lines")
    pairs: list[Pair] = []
    for k, line in enumerate(body):
        fold, pos = divmod(k, 2 * per)
        f = _fields(line)
        expect_same = pos < per
        if len(f) == 3 and expect_same:
            pairs.append(Pair(image_rel(f[0], int(f[1])), image_rel(f[0], int(f[2])), True, fold))
        elif len(f) == 4 and not expect_same:
            pairs.append(Pair(image_rel(f[0], int(f[1])), image_rel(f[2], int(f[3])), False, fold))
        else:
            kind = "matched (name i j)" if expect_same else "mismatched (name1 i name2 j)"
            raise LfwFormatError(f"{path}: line {k + 2} should be {kind}: {line!r}")
    return PairFile(Path(path), pairs, n_sets)


def read_pairs(path: Path | str) -> PairFile:
    path = Path(path)
    return parse_pairs(path.read_text(), path)


def limit_pairs(pf: PairFile, limit: int | None) -> PairFile:
    """Keep at most ``limit`` pairs, balanced: the first limit/2 matched and limit/2 mismatched (per file)."""
    if not limit or limit >= len(pf.pairs):
        return pf
    same = [p for p in pf.pairs if p.same][: (limit + 1) // 2]
    diff = [p for p in pf.pairs if not p.same][: limit // 2]
    return PairFile(pf.path, same + diff, pf.n_sets)


@dataclass(frozen=True)
class Protocol:
    """What to run on a data folder: either one 10-fold file, or a train file and a test file."""

    kind: str  # "tenfold" | "train_test" | "single" (a 1-set file: 10-fold cross-validation within it)
    files: dict[str, PairFile]  # "pairs" or "train"/"test"


def find_protocol(root: Path | str, pairs: Path | str | None = None, limit: int | None = None) -> Protocol:
    root = Path(root)
    if pairs is not None:
        pf = limit_pairs(read_pairs(pairs), limit)
        return Protocol("tenfold" if pf.is_tenfold else "single", {"pairs": pf})
    if (root / "pairs.txt").is_file():
        return Protocol("tenfold", {"pairs": limit_pairs(read_pairs(root / "pairs.txt"), limit)})
    train, test = root / "pairsDevTrain.txt", root / "pairsDevTest.txt"
    if train.is_file() and test.is_file():
        return Protocol(
            "train_test",
            {"train": limit_pairs(read_pairs(train), limit), "test": limit_pairs(read_pairs(test), limit)},
        )
    raise LfwFormatError(f"{root}: no pairs.txt nor pairsDevTrain.txt + pairsDevTest.txt; pass --pairs FILE")


def list_identities(root: Path | str) -> dict[str, list[str]]:
    """{name: [relative image paths sorted by image number]} for every person folder holding images."""
    root = Path(root)
    if not root.is_dir():
        raise LfwFormatError(f"{root}: not a directory")
    out: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        files = []
        for f in os.scandir(entry.path):
            stem, ext = os.path.splitext(f.name)
            if ext.lower() not in (".jpg", ".jpeg", ".png") or not stem.startswith(entry.name + "_"):
                continue
            num = stem[len(entry.name) + 1 :]
            if num.isdigit():
                files.append((int(num), f"{entry.name}/{f.name}"))
        if files:
            out[entry.name] = [rel for _, rel in sorted(files)]
    if not out:
        raise LfwFormatError(f"{root}: no <Name>/<Name>_NNNN.jpg images found")
    return out


def pair_images(pairs: Iterable[Pair]) -> list[str]:
    """Distinct image paths used by the pairs, in first-use order."""
    seen: dict[str, None] = {}
    for p in pairs:
        seen.setdefault(p.a)
        seen.setdefault(p.b)
    return list(seen)

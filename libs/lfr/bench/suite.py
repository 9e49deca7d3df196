"""Verification and identification for several models in one process, each image embedded once per engine.

``lfr bench verify`` and ``lfr bench identify`` each embed every image they need; run separately for three
models with ``--reference`` that is 6 passes over the data per implementation. Here the per-component
vectors are shared (dlib and SFace vectors computed for the single models are reused by the fusion), so
each implementation embeds each image once:

    python -m lfr.bench.suite [--data DIR] [--models dlib,sface,fusion] [--reference] [--experiments] [--out F]

Output: ``{"verify": {model: <verify JSON>}, "identify": {model: <identify JSON>}}``; ``seconds`` in a
later entry excludes embeddings already computed for an earlier one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lfr.bench import identify, verify


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dlib,sface,fusion")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--skip-identify", action="store_true")
    ap.add_argument("--skip-verify", action="store_true")
    identify.add_arguments(ap)  # --data, --reference, --threads, --device, --flip, --dlib-align, --limit, ...
    args = ap.parse_args(argv)
    result: dict = {"verify": {}, "identify": {}}
    for model in args.models.split(","):
        args.model = model
        if not args.skip_verify:
            vargs = argparse.Namespace(**vars(args), pairs=None)
            vargs.limit = None
            r = verify.run(vargs)
            result["verify"][r["model"]] = r
            print(verify.format_text(r), file=sys.stderr, flush=True)
        if not args.skip_identify:
            r = identify.run(args)
            result["identify"][r["model"]] = r
            print(identify.format_text(r), file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Export the platform's own embedders (dlib ResNet, SFace: torch modules) to ONNX files with engine manifests.

    python -m lfr.bench.export_engines OUT_DIR

writes ``OUT_DIR/<id>.onnx`` and ``OUT_DIR/<id>.json`` for ``dlib-resnet-v1-onnx`` and ``sface-2021dec-onnx``:
what a vendor would deliver, so the plug-in path (:mod:`lfr.models.onnx_engine`, ``lfr model add/check``) can be
proved against the built-in engines it must reproduce (same chips, same vectors, same benchmark numbers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lfr.models import scoring
from lfr.models.onnx_engine import file_sha256

EXPORTS = {
    "dlib-resnet-v1-onnx": scoring.DLIB,
    "sface-2021dec-onnx": scoring.SFACE,
}


def _export(module, size: int, path: Path) -> None:
    import torch

    from lfr.models.device import own_layers

    module = module.to("cpu").to(memory_format=torch.contiguous_format).eval()
    x = torch.zeros(2, 3, size, size)
    with own_layers(module):  # a frozen TorchScript copy run in its place (LFR_TORCH_JIT) cannot be exported
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["chips"],
                          output_names=["vectors"], dynamic_axes={"chips": {0: "n"}, "vectors": {0: "n"}})


def export(out: Path, which: tuple[str, ...] = tuple(EXPORTS)) -> dict[str, Path]:
    """Export the engines named (ids of ``EXPORTS``); returns id -> manifest path."""
    import warnings

    from lfr.models.engines import MODELS

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for eid in which:
        base = EXPORTS[eid]
        info, comp = MODELS[base], scoring.COMPONENTS[base]
        onnx_path = out / f"{eid}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            if base == scoring.DLIB:
                from lfr.models.dlib_resnet import load_dlib_resnet

                _export(load_dlib_resnet("cpu"), comp.chip_size, onnx_path)
                alignment = {"kind": "dlib-chip"}
            else:
                from lfr.models.sface import SFACE_TEMPLATE, load_sface

                _export(load_sface("cpu"), comp.chip_size, onnx_path)
                alignment = {"kind": "template", "landmarks": [[float(x), float(y)] for x, y in SFACE_TEMPLATE]}
        manifest = {
            "id": eid,
            "version": f"{comp.version}-onnx1",
            "file": onnx_path.name,
            "sha256": file_sha256(onnx_path),
            # both networks take pixel values 0..255 in RGB and normalise inside
            "input": {"size": comp.chip_size, "layout": "NCHW", "colour": "RGB", "mean": [0, 0, 0], "std": [1, 1, 1]},
            "alignment": alignment,
            "output": {"dim": comp.dim, "normalise": comp.metric == scoring.COSINE},
            "metric": comp.metric,
            "threshold": info.threshold,
            "threshold_1to1": comp.threshold_1to1,
            "flip": bool(info.extra["flip"]),
            "vendor": f"exported from the platform's built-in {base} by lfr.bench.export_engines",
        }
        path = out / f"{eid}.json"
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        written[eid] = path
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lfr.bench.export_engines", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", choices=sorted(EXPORTS), default=None)
    args = ap.parse_args(argv)
    for eid, p in export(args.out, (args.only,) if args.only else tuple(EXPORTS)).items():
        print(f"{eid}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

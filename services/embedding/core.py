"""Pure core of the embedding service: chips (protobuf) -> per-component batches -> vectors (protobuf)."""

from __future__ import annotations

import numpy as np

from lfr.errors import Invalid
from lfr.pb import common_pb2


class ChipError(Invalid, ValueError):
    """A chip this service cannot embed (a domain error: INVALID_ARGUMENT at the edge)."""


def chips_to_arrays(chips: list[common_pb2.Chip], sizes: dict[str, int]) -> dict[str, tuple[list[int], np.ndarray]]:
    """Group chips by component model: model id -> (positions in the input, (N,S,S,3) uint8)."""
    grouped: dict[str, tuple[list[int], list[np.ndarray]]] = {}
    for i, chip in enumerate(chips):
        size = sizes.get(chip.model_id)
        if size is None:
            raise ChipError(f"chip {i}: model {chip.model_id!r} is not served here (serving {sorted(sizes)})")
        if chip.size != size or len(chip.rgb) != size * size * 3:
            raise ChipError(f"chip {i}: expected {size}x{size}x3 bytes for {chip.model_id}")
        pos, arrs = grouped.setdefault(chip.model_id, ([], []))
        pos.append(i)
        arrs.append(np.frombuffer(chip.rgb, dtype=np.uint8).reshape(size, size, 3))
    return {m: (pos, np.stack(arrs)) for m, (pos, arrs) in grouped.items()}


def embed_chips(engine, chips: list[common_pb2.Chip]) -> list[common_pb2.Vector]:
    """One vector per chip, in input order, tagged with its component model id and version."""
    sizes = {c: engine.component_info(c).chip_size for c in engine.components}
    grouped = chips_to_arrays(chips, sizes)
    vectors = engine.embed({m: arr for m, (_, arr) in grouped.items()})
    out: list[common_pb2.Vector | None] = [None] * len(chips)
    for model_id, (positions, _) in grouped.items():
        info = engine.component_info(model_id)
        for pos, vec in zip(positions, vectors[model_id], strict=True):
            out[pos] = common_pb2.Vector(model_id=model_id, model_version=info.version,
                                         values=np.asarray(vec, dtype=np.float32).tolist())
    return out

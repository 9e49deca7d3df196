"""Faces and vectors for a service that holds reference images (watchlist enrollment, identification): the
detection and embedding services as one client, written once.

- `model()`: the embedding service's live model (its description carries the components and the scoring
  recipe); `fresh=True` asks again, since the embedding service may have been restarted with another model.
- `detect()`: one image through detection, with chips (and crops when asked).
- `embed()`: chips of faces through embedding in bounded calls, one vector per face and model component.
- `model_mismatch()`: the one model check: vectors of different models are never compared, so a store
  embedded with another model than the live one refuses the work and says how to re-embed.

No I/O of its own beyond the two RPCs; refusals of the image itself (too large, not an image) come back as the
gRPC errors of detection, which callers turn into per-image results (`limits.IMAGE_REFUSALS`).
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from lfr.pb import detection_pb2, detection_pb2_grpc, embedding_pb2, embedding_pb2_grpc
from lfr.runtime.config import Config
from lfr.runtime.rpc import channel

EMBED_CHIPS_PER_CALL = 256


class EmbeddingUnavailable(Exception):
    """The embedding service could not be asked for its model (callers answer UNAVAILABLE)."""


class FaceStages:
    def __init__(self, config: Config, log=None):
        self.detection = detection_pb2_grpc.DetectionServiceStub(channel(config.detection_target, config))
        self.embedding = embedding_pb2_grpc.EmbeddingServiceStub(channel(config.embedding_target, config))
        self.log = log
        self.current: embedding_pb2.ModelDescription | None = None  # the last description received

    async def model(self, fresh: bool = False) -> embedding_pb2.ModelDescription:
        """The live model. The first call waits until the embedding service answers; `fresh` asks once and raises
        EmbeddingUnavailable if it does not."""
        if fresh:
            try:
                self.current = await self.embedding.GetModel(embedding_pb2.GetModelRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                raise EmbeddingUnavailable(f"cannot reach the embedding service ({exc.code().name})") from None
        while self.current is None:
            try:
                self.current = await self.embedding.GetModel(embedding_pb2.GetModelRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                if self.log is not None:
                    self.log.warning("embedding.unavailable", code=exc.code().name)
                await asyncio.sleep(0.5)
        return self.current

    async def detect(self, image: bytes, crops: bool = False, timeout: float = 60) -> detection_pb2.DetectResponse:
        return await self.detection.Detect(detection_pb2.DetectRequest(image=image, include_chips=True,
                                                                       include_crops=crops), timeout=timeout)

    async def embed(self, chips_per_face: list[list[bytes]], timeout: float = 120
                    ) -> dict[tuple[str, str], np.ndarray]:
        """One vector per face and model component: (model id, version) -> (faces, dim) float32, in face order."""
        flat = [(n, c) for n, chips in enumerate(chips_per_face) for c in chips]
        out: dict[tuple[str, str], list] = {}
        for start in range(0, len(flat), EMBED_CHIPS_PER_CALL):
            part = flat[start: start + EMBED_CHIPS_PER_CALL]
            resp = await self.embedding.Embed(embedding_pb2.EmbedRequest(chips=[c for _, c in part]), timeout=timeout)
            for (n, _), v in zip(part, resp.vectors, strict=True):
                out.setdefault((v.model_id, v.model_version), [None] * len(chips_per_face))[n] = v.values
        return {key: np.asarray(vs, dtype=np.float32) for key, vs in out.items()}


def model_mismatch(model: embedding_pb2.ModelDescription, model_id: str, model_version: str, what: str,
                   holder: str, remedy: str) -> str:
    """'' when `holder` (a watchlist, a gallery) is embedded with the live model; else why `what` is refused."""
    if (model.model_id, model.model_version) == (model_id, model_version):
        return ""
    return (f"cannot {what}: {holder} is embedded with {model_id} {model_version} but the embedding service runs "
            f"{model.model_id} {model.model_version}; {remedy}")

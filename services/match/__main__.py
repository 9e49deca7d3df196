import os

# match's per-face decision is one small matrix product (lfr.models.scoring.ExactIndex): on a busy machine
# OpenBLAS's extra threads only wait for a core, so match runs it on one (an operator's setting wins)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from lfr.match.service import MatchService  # noqa: E402
from lfr.runtime.service import main  # noqa: E402

main(MatchService)

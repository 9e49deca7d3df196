from lfr.embedding.service import EmbeddingService
from lfr.runtime.service import main

main(EmbeddingService)

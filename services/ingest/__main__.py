from lfr.ingest.service import IngestService
from lfr.runtime.service import main

main(IngestService)

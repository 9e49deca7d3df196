from lfr.detection.service import DetectionService
from lfr.runtime.service import main

main(DetectionService)

from lfr.identification.service import IdentificationService
from lfr.runtime.service import main

main(IdentificationService)

from lfr.match.service import MatchService
from lfr.runtime.service import main

main(MatchService)

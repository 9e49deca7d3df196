from lfr.runtime.service import main
from lfr.watchlist.service import WatchlistService

main(WatchlistService)

from lfr.console.app import main

main()

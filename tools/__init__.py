"""Development tools run from a source checkout (not shipped in the lfr package)."""

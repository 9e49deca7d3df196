"""The watchlist service."""

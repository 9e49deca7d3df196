"""The detection service."""

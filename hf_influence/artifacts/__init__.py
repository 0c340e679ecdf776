"""Artifacts: score tables, networks and their folders on disk and on the Hub, with their cards."""

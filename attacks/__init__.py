"""Reconstruction attacks on captured traffic, scored against the private data."""

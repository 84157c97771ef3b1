"""Resumable pre-training loaders: one step loader over text and image batch sources."""

"""The on-disk contracts shared by prepare and training: shard formats, manifest, locations (no Beam)."""

"""Pre-processing: text and image corpora to shuffled WebDataset shards and a manifest (Apache Beam)."""

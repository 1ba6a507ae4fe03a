"""Data pipelines: image folders (here) and WebDataset shards."""

"""Training-time data: WebDataset token shards, the resumable mixture stream, loaders."""

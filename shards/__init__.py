"""Turn an image collection into verified WebDataset shards (build, verify, manifest)."""

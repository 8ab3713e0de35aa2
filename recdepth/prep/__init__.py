"""Data preparation stages: ingest, tokenizer, tokenize, shuffle, shard."""

"""Checkpoint I/O: reading weights lazily, writing shards and checkpoints atomically, the statistics cache,
the compression records, the model card, the Hub and model loading."""

"""Data: the shard schema shared with data_prep, the streaming pipeline, image transforms."""

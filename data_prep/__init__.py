"""data_prep: raw medical image-text data -> WebDataset shards (+ the synthetic demo corpus)."""

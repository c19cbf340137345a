"""Models: CLIP towers on open_clip/timm/transformers, attention implementations."""

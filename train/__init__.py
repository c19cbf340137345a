"""Training entry points (clip, instruct, export) and what they share: the loop, distributed set-up, optimisers."""

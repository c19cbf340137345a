"""medvlm library: models, losses, data pipeline, checkpoint and hub I/O.

The library never parses argv and never initialises a process group; the entry points in
``train/``, ``eval/`` and ``data_prep/`` do.
"""
__version__ = "0.1.0"

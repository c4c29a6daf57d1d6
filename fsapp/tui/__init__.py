"""The Textual interface: runs, new run, live dashboard, evaluate, compare, plugins.

The engine runs in worker threads and its events become messages; every screen reads and writes
the same run directories as the CLI (``config.toml``, ``metrics.jsonl``, checkpoints, ``eval/``).
"""

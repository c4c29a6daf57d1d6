"""The Textual interface: runs, new run, live dashboard, evaluate, compare, plugins.

Every job it starts is an ``fsapp train`` or ``fsapp eval`` process (:mod:`fsapp.app.jobs`); it
follows runs through their directories (``config.toml``, ``metrics.jsonl``, checkpoints, ``eval/``)
and steers any running run through the run directory's control channel, whoever started it.
Screens live in :mod:`fsapp.tui.screens`, one module each; they talk to the app only through
:mod:`fsapp.tui.messages`.
"""

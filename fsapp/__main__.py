"""``python -m fsapp`` (and ``torchrun -m fsapp``) runs the CLI."""

from fsapp.cli.main import main

main()

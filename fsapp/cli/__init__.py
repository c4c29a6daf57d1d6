"""The Typer command-line interface; renders engine events with Rich."""

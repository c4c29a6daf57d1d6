"""The engine: training and evaluation loops that yield events and never print."""

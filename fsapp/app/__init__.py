"""The application layer: the jobs both front ends run (train, evaluate) and how they are launched."""

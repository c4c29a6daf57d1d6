"""Built-in components, registered through the same pluggy hooks third-party plugins use."""

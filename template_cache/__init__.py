"""The function template format: write, verify, and restore."""

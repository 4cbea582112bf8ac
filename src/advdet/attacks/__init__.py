"""The attacks layer."""

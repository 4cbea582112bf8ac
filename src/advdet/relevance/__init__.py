"""The relevance layer."""

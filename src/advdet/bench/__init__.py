"""The bench layer."""

"""The per-domain policy file."""

"""Model definitions and the checkpoint registry (manifest of sha256 sums)."""

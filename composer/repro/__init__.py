"""Reproductions of the paper's experiments at CPU size (see docs/REPRODUCTION.md)."""

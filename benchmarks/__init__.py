"""Side-by-side speed runs: fastattn against what its users would otherwise write."""

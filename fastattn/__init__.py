"""fastattn: analyse thousands of transformer attention dumps as one labelled array."""
__version__ = "0.1.0"

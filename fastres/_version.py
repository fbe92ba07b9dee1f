"""The package version (its own module, so code inside fastres can read it without importing
the package root)."""
__version__ = "0.1.0"

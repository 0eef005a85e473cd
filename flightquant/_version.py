"""The package version, in one place (the package root and the modules below it read it)."""

__version__ = "0.2.0"

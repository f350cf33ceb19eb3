"""Open Model Pipeline: raw data to a public, recreatable model release."""

__version__ = "0.1.0"

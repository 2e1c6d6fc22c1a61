"""oodguard: an out-of-distribution guard for image classifiers in production."""

__version__ = "0.1.0"

"""The package's version, in a module of its own: bundles and engine records carry it, and the
exporters read it without importing the runtime that `qasr` itself brings in."""

__version__ = "0.1.0"

"""The inference engines behind the pipelines: one interface (interface.py), one file per backend,
and the choice among them (select.py). Nothing above this folder knows which one runs."""

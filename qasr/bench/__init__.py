"""Benchmarks against named peers, and the report they write (docs/benchmarks.md).

Apart from the product: nothing in qasr.runtime, qasr.serve or qasr.export imports this package.
`qasr bench` (official.py) and the scripts in scripts/ build on harness.py (checkpoints, speech,
the machine, bandwidth), workers.py (one measurement in a fresh process) and docs.py (the report).
"""

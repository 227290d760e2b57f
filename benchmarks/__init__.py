"""Benchmarks of dgl_crystalframer against the published CrystalFramer numbers (``python -m benchmarks.jarvis``)."""

"""Helpers shared by the tests and the benchmarks: tiny models, reference imports, data."""

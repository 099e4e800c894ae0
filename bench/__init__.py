"""Benchmarks (programs, not tests): `python -m bench --help`."""

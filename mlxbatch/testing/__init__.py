"""Helpers for tests and benchmarks that need a real, loadable model without a download."""

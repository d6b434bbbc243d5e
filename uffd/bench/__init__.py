"""Baselines and helpers for the pyuffd benchmark suite."""

"""Pipelines: the only place that combines stages (recipe + refiners, recipe + lowering + autotuning, benchmarks)."""

"""Side-by-side benchmarks of mlxbatch against its anchors (`python -m benchmarks.run`).

This package holds only the benchmark harness: random-weight model shapes (models.py),
deterministic workload files (workloads.py), the MLX contenders (contenders.py), the optional
transformers contender (hf.py), reporting (report.py) and the CLI (run.py). It is not part of
the installed `mlxbatch` package and nothing in mlxbatch imports it.
"""

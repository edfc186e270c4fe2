"""The pipeline stages: read, validate, render, plan, engine (each a function over records)."""

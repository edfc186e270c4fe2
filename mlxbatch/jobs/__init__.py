"""Job-level code: the spec, the runner that composes the stages, the store, export."""

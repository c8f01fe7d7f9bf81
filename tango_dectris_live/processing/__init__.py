"""Live analysis: LiberTEM live dataset, analyses registry, acquisition runner, result snapshots."""

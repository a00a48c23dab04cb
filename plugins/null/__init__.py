"""The null plugin: a fixed score at no cost, for measuring the frame path itself (benchmarks, tests)."""

"""The admin commands: refit, evaluate, publish, watch, samples, demo and bench.

They build on the foundation and may reuse the worker's pieces (evaluate and bench score exactly as
the worker does, through `inspector.worker.decode` and `inspector.worker.serving`); neither the
worker nor the foundation imports a tool.
"""

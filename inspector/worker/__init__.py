"""`inspector run`: everything that serves frames, and nothing the admin tools need to run.

loop (the Worker: consume -> decode -> batch -> score -> publish -> ack, reload, shutdown),
consumer (the broker thread, sole owner of the worker's pika connection), decode (capture body
to pixels, with every limit), batcher (micro-batches per model version), serving (the models in
service, warm-up, reload) and metrics (every metric and the /metrics, /healthz, /readyz server).
It imports the foundation (`inspector.*`) and never a tool.
"""

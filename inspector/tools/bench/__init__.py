"""`inspector bench`, one module per stage, each importing only those below it:
options -> frames -> model_stages (1 raw plugin, 2 decode) -> broker_stage (3 the whole path) -> report -> run."""

"""The control API: start, stop, pause and inspect runs over HTTP (FastAPI)."""

"""The HTTP service: a FastAPI app over a run's model, with API keys and Prometheus metrics."""

"""Data: reading, validation, cleaning, splitting and profiling."""

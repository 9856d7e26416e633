"""Networks: Hugging Face encoders with a head, and MLPs for tabular data."""

"""Closing the loop: retrain a registered model with the corrections its users sent, and promote the
result only when it is better on the same fixed test split (the promotion gate)."""

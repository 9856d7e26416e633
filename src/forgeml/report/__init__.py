"""The model card (Markdown and self-contained HTML)."""

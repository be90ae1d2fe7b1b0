"""The adapter registry: where it lives (home), the store, and its operations."""

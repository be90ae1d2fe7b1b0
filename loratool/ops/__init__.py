"""The operations: one module per command."""

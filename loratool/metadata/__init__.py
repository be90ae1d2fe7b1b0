"""What files say about themselves: JSON schemas, provenance records, the Hub card."""

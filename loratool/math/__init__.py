"""The math, as pure functions over tensors: factorizations, merges, TIES/DARE."""

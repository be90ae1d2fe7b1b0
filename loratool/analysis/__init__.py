"""The rank analysis: the paper's spectra (pure functions) and the HTML report."""

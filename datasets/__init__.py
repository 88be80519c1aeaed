"""Benchmark datasets in their real on-disk formats, and the synthetic world that writes them."""

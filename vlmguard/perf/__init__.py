"""Performance benchmarks: vlmguard perf prefill|decode|serve."""

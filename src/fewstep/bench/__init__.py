"""``fewstep bench``: the benchmark matrix of BENCHMARKS.md as cached, resumable jobs."""

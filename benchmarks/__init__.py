"""Speed and memory benchmarks of the step, the token loss and the judge (bench.py: `python -m benchmarks.bench`)."""

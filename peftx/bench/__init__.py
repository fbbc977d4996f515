"""python -m peftx.bench: side-by-side benchmarks against the anchors."""

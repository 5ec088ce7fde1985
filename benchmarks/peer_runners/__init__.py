"""Scripts run by `python -m benchmarks peers` inside a peer's own Python environment: each
reads a job as JSON on stdin and prints its result as JSON on the last line of stdout. They
import nothing from this project (the peer's environment does not have it)."""

"""The exit codes a worker process says how it ended with, read by whoever started it (the supervisor of
`particalize serve`, the launcher of a context-parallel worker)."""

EXIT_LOAD_FAILED = 3
"""`particalize worker` exits with this when the model cannot be loaded (restarting would not help)."""

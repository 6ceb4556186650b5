"""Processes: the supervisor of `particalize serve`'s worker children, the exit codes they end with, a child dying
with its parent, and graceful stops on signals.

Knows processes, signals and environment variables; must not know the store, the HTTP API or what a worker does
with a task (server.worker uses it, not the reverse)."""

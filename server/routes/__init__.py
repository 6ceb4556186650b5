"""The HTTP routes: Wiro's /v1 API for this one tool, and /files for outputs and uploads."""

"""The Wiro-compatible HTTP server: auth, request parsing, URL safety, store, worker, routes."""

"""Particalize: a self-hosted, Wiro-compatible Wan2.1 image-to-video server."""

__version__ = "0.1.0"

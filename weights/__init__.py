"""Where weights live, how they are fetched from a hub and checked on disk. No weights are committed."""

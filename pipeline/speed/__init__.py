"""Speed options applied to a loaded pipeline: attention backends (FlashAttention-4), batched guidance, memory modes,
float8, step caches, compile (and its cache), and sharding attention over a context-parallel group.

Applies options and falls back when one fails; must not know requests, the generator or how the processes of a
context-parallel group are started and driven (pipeline.parallel)."""

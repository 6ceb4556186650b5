"""One video over several processes: the process group and the checks before loading (`group`), and what each rank
does with a request (`run`: the rank-0 generator and the follower loop).

Sits above the generator, which it drives; must not know who starts the processes (the worker, the CLI)."""

"""A persistent torch.compile cache, so that a restarted worker skips the 20-124 s of compilation.

PyTorch's portable "mega-cache" (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) holds the
inductor, AOTAutograd, Triton and autotuning artifacts of a compilation in one blob. It is saved after the
warm-up compiled something new and loaded before the next warm-up, from one file per compile configuration
(torch version, GPU, model config, the options that change the graphs) under the data directory. Dynamo still
traces at start (seconds); the code generation and autotuning are what the cache skips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def _compiled_graphs() -> int:
    """Inductor graphs compiled (not found in a cache) so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm{major}{minor} cuda {torch.version.cuda}"
    return f"{device.type} {platform.machine()}"


def cache_key(transformer: torch.nn.Module, device: torch.device, graph_options: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the compiled code: the artifacts of another key are of no use (or wrong)."""
    config = dict(getattr(transformer, "config", {}))
    return {
        "torch": torch.__version__,
        "device": _device_name(device),
        "dtype": str(next(transformer.parameters()).dtype),
        "transformer": {k: v for k, v in sorted(config.items()) if not k.startswith("_")},
        **graph_options,
    }


@dataclass
class CompileCache:
    directory: Path
    key: dict[str, Any]

    @property
    def path(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.directory / f"{digest}.bin"

    def load(self) -> bool:
        """Load the artifacts saved for this key, if any; a bad file is logged and ignored (then overwritten)."""
        self._compiled_before = _compiled_graphs()
        if not self.path.is_file():
            log.info("compile cache: nothing saved yet at %s (this start compiles)", self.path)
            return False
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as exc:  # a truncated or foreign file must not stop the worker: compile instead
            log.warning("compile cache %s unreadable (%s: %s); compiling instead", self.path, type(exc).__name__, exc)
            return False
        log.info("compile cache loaded from %s (%s)", self.path, info)
        return info is not None

    def save(self) -> bool:
        """Save what this process compiled since `load` (nothing new: the file stays as it is). Atomic."""
        if _compiled_graphs() <= getattr(self, "_compiled_before", 0) and self.path.is_file():
            return False
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as tmp:
            tmp.write(artifacts[0])
        os.replace(tmp.name, self.path)
        self.path.with_suffix(".json").write_text(json.dumps(self.key, indent=2, default=str))
        log.info("compile cache saved to %s (%d bytes)", self.path, len(artifacts[0]))
        return True

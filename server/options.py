"""Everything the HTTP app is built from: each part's own options, composed once by the entry point
(particalize.compose_server builds them from the settings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.auth import AuthOptions
from server.callbacks import CallbackOptions
from server.limits import RequestLimits
from server.storage import StorageOptions
from server.tool_info import ToolOptions


@dataclass(frozen=True)
class ServerOptions:
    storage: StorageOptions
    auth: AuthOptions = field(default_factory=AuthOptions)
    limits: RequestLimits = field(default_factory=RequestLimits)
    tool: ToolOptions = field(default_factory=ToolOptions)
    callbacks: CallbackOptions = field(default_factory=CallbackOptions)
    rate_limit_per_minute: int = 0
    """Requests one API key (with no keys: one client address) may make per minute; 0: no limit."""
    rate_limit_storage: str = "memory://"
    """Where the rate limit counts live: this process's memory, or a Redis URL the replicas share."""
    rate_limit_key_prefix: str = "particalize"

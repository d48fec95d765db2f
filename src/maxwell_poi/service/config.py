"""The control plane's settings: flags override environment variables override defaults; printed at start."""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..ledger import ledger_url
from ..registry.models import poi_home

ENV_PREFIX = "POI_SERVE_"  # e.g. POI_SERVE_PORT=8750, POI_SERVE_DB=postgresql+psycopg://...
# where queued audits run (service.audit_backends; not imported here: it loads torch)
AUDIT_BACKENDS = ("thread", "process", "ray")


@dataclass
class ServiceConfig:
    db: str = ""  # database URL or SQLite path; "" = $POI_HOME/ledger.sqlite
    host: str = "127.0.0.1"
    port: int = 8750
    lease_ttl_s: float = 600.0
    watts_per_core: float = 12.0  # CPU energy = sandbox CPU-seconds x this (an estimate)
    reserve_micro_per_j: int = 1  # the auction's reserve price
    request_skew_s: float = 60.0  # signed requests: accepted clock difference
    audit_workers: int = 1  # workers running queued L4 audits (threads, processes or Ray actors)
    audit_backend: str = "process"  # where they run: one of AUDIT_BACKENDS
    ray_address: str = ""  # audit_backend "ray": the cluster to join; "" = a local Ray of this host's cores
    max_body_bytes: int = 16 << 20
    max_leases_per_pull: int = 64
    max_open_bids: int = 256  # per agent: a flood of bids is refused (429), not stored
    exact_blocks: int = 2  # exact tier: most blocks per opening; a challenge opens every block, in parts
    opening_timeout_s: float = 30.0  # exact tier: how long an agent has to answer one challenge
    challenge_window_s: float = 60.0  # exact tier: how long a receipt stays challengeable, stake held
    group_commit_max: int = 64  # intake: most settlements committed together (ledger.group_commit); 0 = off
    canary_rate: float = 0.02  # gateway: after a completion, its agent's chance of a canary (gateway.canary)
    admin_token: str = field(default="", repr=False)  # "" = $POI_HOME/admin.token (created once)

    @classmethod
    def from_env(cls, **overrides: Any) -> ServiceConfig:
        """Defaults, then POI_SERVE_* variables, then the non-None `overrides` (the flags)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                kind = type(getattr(cls(), f.name))
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ValueError(
                        f"{ENV_PREFIX}{f.name.upper()}: expected a {kind.__name__}, got {raw!r}"
                    ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("lease_ttl_s", "watts_per_core", "request_skew_s", "opening_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in (
            "reserve_micro_per_j",
            "audit_workers",
            "max_body_bytes",
            "max_leases_per_pull",
            "max_open_bids",
            "exact_blocks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)!r}")
        if self.group_commit_max < 0:
            raise ValueError(f"group_commit_max: expected >= 0 (0: off), got {self.group_commit_max!r}")
        if not 0.0 <= self.canary_rate <= 1.0:
            raise ValueError(f"canary_rate: expected a probability in [0, 1], got {self.canary_rate!r}")
        if not self.challenge_window_s >= 0:
            raise ValueError(f"challenge_window_s: expected >= 0, got {self.challenge_window_s!r}")
        if self.audit_backend not in AUDIT_BACKENDS:
            raise ValueError(
                f"audit_backend: expected one of {', '.join(AUDIT_BACKENDS)}, got {self.audit_backend!r}"
            )
        if self.ray_address and self.audit_backend != "ray":
            raise ValueError(
                f"ray_address: expected only with audit_backend 'ray', got {self.audit_backend!r}"
            )

    @property
    def url(self) -> str:
        return ledger_url(self.db or None)

    def token(self) -> str:
        """The admin token: the configured one, else $POI_HOME/admin.token (made, mode 0600, once)."""
        if self.admin_token:
            return self.admin_token
        path = self.token_path()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
        return path.read_text().strip()

    def token_path(self) -> Path:
        return poi_home() / "admin.token"

    def describe(self) -> dict[str, Any]:
        """What is printed at start: every setting, the database without its password, no token."""
        out = asdict(self)
        out.pop("admin_token")
        url = self.url
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            url = f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
        out["db"] = url
        out["admin_token"] = (
            "from --admin-token/POI_SERVE_ADMIN_TOKEN" if self.admin_token else str(self.token_path())
        )
        return out

"""`poi node DIR`: a node without a control plane, driven by a directory.

    DIR/node.json      {"node_id": "node-a",
                        "agents": {"alice": {"command": "poi agent --key alice.pem --resident"}},
                        "concurrency": 1, "audit_rate": 1.0}
    DIR/keyring.json   enrolled agents (`poi keygen --agent-id ID --keyring DIR/keyring.json`)
    DIR/leases/*.json  one lease per file; its agent_id picks the resident agent
    DIR/node.pem       the node's Ed25519 key (created on first run; node.pub holds the public half)

Each agent is started once (commands run in DIR) and handed its leases `concurrency` at a time.
For each lease the node writes DIR/out/<lease_id>/{receipt.json, evidence.dsse.json, result.json}
(atomically; a lease that already has result.json is not served again) and DIR/out/summary.json.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..protocol.errors import LeaseFormatError
from ..protocol.files import write_json_atomic
from ..protocol.keys import Keyring
from ..protocol.lease import Lease
from ..registry.models import Registry
from ..verifier.policy import Verifier
from .attest import NodeKey
from .node import Node, NodeResult


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str | list[str] = Field(description="the agent's command line, run in the node directory")

    def argv(self) -> list[str]:
        return shlex.split(self.command) if isinstance(self.command, str) else list(self.command)


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node_id: str = Field(default="node", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    agents: dict[str, AgentConfig]
    concurrency: int = Field(default=1, ge=1, le=64, description="leases handed to an agent at once")
    audit_rate: float = Field(default=1.0, ge=0.0, le=1.0)


@dataclass
class NodeDirectory:
    root: Path
    config: NodeConfig
    leases: list[Lease] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # files refused, with the reason

    @classmethod
    def load(cls, root: Path) -> NodeDirectory:
        """Reads node.json and every lease; raises ValueError for an unusable node.json, lists
        unreadable lease files in `problems` and goes on."""
        path = root / "node.json"
        try:
            config = NodeConfig.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise ValueError(f"{path}: expected a node configuration file, {exc.strerror}") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "node.json"
            raise ValueError(f"{path}: {where}: {first['msg']}") from None
        out = cls(root, config)
        for lease_file in sorted((root / "leases").glob("*.json")):
            try:
                lease = Lease.from_json(lease_file.read_bytes())
            except (LeaseFormatError, OSError) as exc:
                out.problems.append(f"{lease_file.name}: {exc}")
                continue
            if lease.agent_id not in config.agents:
                out.problems.append(
                    f"{lease_file.name}: agent {lease.agent_id!r} is not configured in node.json"
                )
                continue
            out.leases.append(lease)
        return out

    def done(self, lease: Lease) -> bool:
        return (self.out_dir(lease) / "result.json").exists()

    def out_dir(self, lease: Lease) -> Path:
        return self.root / "out" / lease.lease_id

    def node_key(self) -> NodeKey:
        key = NodeKey.ensure(self.root / "node.pem")
        public = self.root / "node.pub"  # what a control plane enrolls; derived, so rewritten if lost
        if not public.exists():
            public.write_text(key.public_hex + "\n")
        return key

    def keep(self, r: NodeResult) -> None:
        d = self.out_dir(r.lease)
        d.mkdir(parents=True, exist_ok=True)
        (d / "receipt.json").write_bytes(r.run.receipt)
        (d / "evidence.dsse.json").write_bytes(r.signed_evidence)
        appraised = r.result.as_dict() if r.result else {}
        write_json_atomic(d / "result.json", {**appraised, "node": r.summary()})  # last: marks done


def run_directory(
    root: Path, registry: Registry | None = None, on_progress: Callable[[str, int, int], None] | None = None
) -> dict[str, Any]:
    """Serve every pending lease in `root` (see the module docstring); returns the summary."""
    nd = NodeDirectory.load(root)
    registry = registry or Registry()
    keyring = Keyring.load(root / "keyring.json")
    verifier = Verifier.default(registry, keyring, audit_rate=nd.config.audit_rate)
    pending = [lease for lease in nd.leases if not nd.done(lease)]
    rows: list[dict[str, Any]] = []
    served = 0
    with Node(nd.config.node_id, nd.node_key(), verifier, registry) as node:
        for agent_id, agent_cfg in nd.config.agents.items():
            mine = [lease for lease in pending if lease.agent_id == agent_id]
            if not mine:
                continue
            node.start_agent(agent_id, agent_cfg.argv(), cwd=str(root))
            for i in range(0, len(mine), nd.config.concurrency):
                wave = mine[i : i + nd.config.concurrency]
                if on_progress:
                    on_progress(f"{agent_id}: {len(wave)} lease(s)", served, len(pending))
                for r in node.serve(agent_id, wave):
                    nd.keep(r)
                    rows.append(r.summary())
                served += len(wave)
    summary = {
        "node_id": nd.config.node_id,
        "served": rows,
        "already_done": len(nd.leases) - len(pending),
        "refused_files": nd.problems,
        "affirmed": sum(r["verdict"] == "affirming" for r in rows),
    }
    write_json_atomic(root / "out" / "summary.json", summary)
    return summary

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep user state (registry of local models) out of the developer's home directory."""
    os.environ["POI_HOME"] = str(tmp_path_factory.mktemp("poi-home"))
    from maxwell_poi.prover.harness import quiet_libraries

    quiet_libraries()


@pytest.fixture(scope="session")
def registry():
    from maxwell_poi.registry.models import Registry

    return Registry()


@pytest.fixture(scope="session")
def agent_key():
    from maxwell_poi.protocol.keys import AgentKey

    return AgentKey.generate()


@pytest.fixture()
def keyring(agent_key):
    from maxwell_poi.protocol.keys import Keyring

    return Keyring({"agent-1": agent_key.public_hex})


@pytest.fixture()
def verifier(registry, keyring):
    from maxwell_poi.verifier.policy import Verifier

    return Verifier.default(registry, keyring)


@pytest.fixture(scope="session")
def prover(agent_key, registry):
    from maxwell_poi.prover.sdk import Prover

    return Prover(agent_key, registry)

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

    return Verifier.offline(registry, keyring)  # receipts alone: no evidence, so L1/L2 not required


@pytest.fixture(scope="session")
def prover(agent_key, registry):
    from maxwell_poi.prover.sdk import Prover

    return Prover(agent_key, registry)


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """Say which sandbox accounting this run measured with, and that the /proc fallback ran."""
    from maxwell_poi.node.sandbox import available_sources

    usable = [s.value for s, why in available_sources().items() if why is None]
    unusable = {s.value: why for s, why in available_sources().items() if why is not None}
    terminalreporter.write_line(
        f"sandbox accounting here: {usable[0] if usable else 'none'} "
        f"(usable: {', '.join(usable)}; not usable: {unusable or 'none'}); "
        "the /proc fallback is also run forced (test_sandbox, test_resident)"
    )

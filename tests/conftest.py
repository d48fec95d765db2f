from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, make_url, text

from maxwell_poi.ledger import Ledger, open_ledger_db

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


# -- the ledger on SQLite and on PostgreSQL (test_ledger, test_ledger_settle) --------------------------

PG_URL = os.environ.get("POI_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine | str]:
    """An autocommit engine on the PostgreSQL server, or why there is none."""
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to reach the server: reported below, per test
        admin.dispose()
        yield f"{type(exc).__name__}: {exc}".splitlines()[0]
        return
    yield admin
    admin.dispose()


@pytest.fixture()
def pg_schemas(pg_admin: Engine | str) -> Iterator[Callable[[], tuple[str, dict[str, str]]]]:
    """Makes fresh schemas (url, connect_args with it as the search_path), all dropped afterwards."""
    if isinstance(pg_admin, str):
        url = make_url(PG_URL)
        reason = f"PostgreSQL expected at {url.host}:{url.port or 5432} under CI, got: {pg_admin}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    made: list[str] = []

    def make() -> tuple[str, dict[str, str]]:
        schema = f"ledger_test_{uuid.uuid4().hex[:12]}"
        with pg_admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        made.append(schema)
        return PG_URL, {"options": f"-csearch_path={schema}"}

    try:
        yield make
    finally:
        with pg_admin.connect() as conn:
            for schema in made:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture()
def pg_schema(pg_schemas: Callable[[], tuple[str, dict[str, str]]]) -> tuple[str, dict[str, str]]:
    """A fresh schema per test, made the connection's search_path, dropped afterwards."""
    return pg_schemas()


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path) -> Iterator[Callable[[], Engine]]:
    """Opens (and migrates) the same test database each time it is called."""
    engines: list[Engine] = []
    if request.param == "sqlite":
        url, args = str(tmp_path / "ledger.sqlite"), {}
    else:
        url, args = request.getfixturevalue("pg_schema")

    def open_() -> Engine:
        engines.append(open_ledger_db(url, connect_args=args))
        return engines[-1]

    yield open_
    for engine in engines:
        engine.dispose()


@pytest.fixture()
def engine(opener: Callable[[], Engine]) -> Engine:
    return opener()


@pytest.fixture()
def book(engine: Engine) -> Ledger:
    ledger = Ledger(engine)
    ledger.deposit("alice", 1_000_000, "dep:alice")
    ledger.deposit("bob", 1_000_000, "dep:bob")
    return ledger

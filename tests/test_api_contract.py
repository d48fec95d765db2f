"""One typed API contract: every route of the control plane and the gateway documents its 2xx answer
as a model in the OpenAPI spec, and ServiceClient returns those same models."""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Iterator
from dataclasses import fields

import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from maxwell_poi.economics.tiers import TierPolicy
from maxwell_poi.gateway import Gateway, mount_gateway
from maxwell_poi.service import ControlPlane, ServiceConfig
from maxwell_poi.service.api import create_app
from maxwell_poi.service.client import ServiceClient
from maxwell_poi.service.wire import ConfigView, PolicyView

# routes whose 2xx answer is not a JSON model, each with the reason
NOT_JSON = {
    ("GET", "/metrics"): "Prometheus text format (text/plain; version=0.0.4)",
}
# routes whose 2xx answer is a JSON model or, with `stream: true`, a server-sent event stream
STREAMS = {
    ("POST", "/v1/completions"): "OpenAI's SSE stream when stream is true",
    ("POST", "/v1/chat/completions"): "OpenAI's SSE stream when stream is true",
}
# /dashboard and /dashboard/static/{name} (the HTML page and its assets) are left out of the spec
# (include_in_schema=False): they are a page, not the API


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    home = tmp_path_factory.mktemp("contract")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_HOME", str(home / "home"))
        config = ServiceConfig.from_env(db=str(home / "cp.sqlite"), admin_token="t", audit_backend="thread")
        control = ControlPlane(config)
        app = create_app(control)
        mount_gateway(app, Gateway(control))
        yield app
        control.close()


def _routes(spec: dict) -> Iterator[tuple[str, str, dict]]:
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            yield method.upper(), path, op


def _model_ref(schema: dict) -> str | None:
    """The component a JSON schema names (itself, or the items of an array of it), else None."""
    if "$ref" in schema:
        return schema["$ref"]
    if schema.get("type") == "array" and "$ref" in schema.get("items", {}):
        return schema["items"]["$ref"]
    return None


def test_every_route_documents_its_answer_as_a_model(app: FastAPI) -> None:
    spec = app.openapi()
    routes = list(_routes(spec))
    assert len(routes) >= 30, f"expected the control plane's and the gateway's routes, got {len(routes)}"
    missing = []
    for method, path, op in routes:
        ok = [code for code in op["responses"] if code.startswith("2")]
        if not ok:
            missing.append(f"{method} {path}: no 2xx response")
            continue
        content = op["responses"][ok[0]].get("content", {})
        if (method, path) in NOT_JSON:
            assert "application/json" not in content or not _model_ref(content["application/json"]["schema"])
            continue
        json_schema = content.get("application/json", {}).get("schema", {})
        ref = _model_ref(json_schema)
        if ref is None:
            missing.append(f"{method} {path}: 2xx answer {json_schema or 'undocumented'}, not a model")
            continue
        name = ref.rsplit("/", 1)[-1]
        assert spec["components"]["schemas"][name].get("properties"), f"{method} {path}: {name} is empty"
        if (method, path) in STREAMS:
            assert "text/event-stream" in content, f"{method} {path}: its stream is not documented"
    assert not missing, "routes without a response model:\n" + "\n".join(missing)
    for key in [*NOT_JSON, *STREAMS]:  # the exemptions name routes that exist
        assert key in {(m, p) for m, p, _ in routes}, f"{key} is exempted but not a route"


def test_every_refusal_is_documented_as_the_error_body(app: FastAPI) -> None:
    spec = app.openapi()
    for method, path, op in _routes(spec):
        error = op["responses"].get("4XX", {}).get("content", {}).get("application/json", {})
        assert _model_ref(error.get("schema", {})) == "#/components/schemas/ErrorBody", f"{method} {path}"


def test_service_client_returns_models() -> None:
    public = {
        name: fn
        for name, fn in inspect.getmembers(ServiceClient, inspect.isfunction)
        if not name.startswith("_") and name not in ("close", "request")  # request: the raw JSON
    }
    assert len(public) >= 15, sorted(public)
    untyped = []
    for name, fn in public.items():
        returned = typing.get_type_hints(fn)["return"]
        inner = typing.get_args(returned)[0] if typing.get_origin(returned) is list else returned
        if isinstance(inner, typing.TypeVar):  # call / call_list: the model their caller names
            inner = inner.__bound__
        if not (inspect.isclass(inner) and issubclass(inner, BaseModel)):
            untyped.append(f"{name} -> {returned!r}")
    assert not untyped, "ServiceClient methods not returning pydantic models:\n" + "\n".join(untyped)


def test_the_answer_models_track_what_they_describe() -> None:
    """PolicyView and ConfigView mirror dataclasses: a field added there must show here."""
    assert set(PolicyView.model_fields) == {f.name for f in fields(TierPolicy)}
    assert set(ConfigView.model_fields) <= {f.name for f in fields(ServiceConfig)}


def test_poi_client_json_is_the_servers_json(app: FastAPI, tmp_path) -> None:
    """`poi client … --json` prints the server's body unchanged, read back through the models."""
    import httpx
    from typer.testing import CliRunner

    from maxwell_poi.cli import app as cli
    from maxwell_poi.demo.harness import LoopbackServer
    from maxwell_poi.protocol.keys import AgentKey

    key = AgentKey.generate()
    key.save(tmp_path / "a.pem")
    admin = ["--server", "", "--admin-token", "t", "--json"]
    agent = ["--agent-id", "cli-a", "--key", str(tmp_path / "a.pem"), "--server", "", "--json"]
    with LoopbackServer(app) as url:
        admin[1] = agent[5] = url
        calls = [
            (["enroll-agent", "--agent-id", "cli-a", "--key", str(tmp_path / "a.pem"), *admin], None),
            (["deposit", "--agent-id", "cli-a", "--amount", "5000", "--idempotency-key", "k1", *admin], None),
            (["ledger", *admin], ("GET", "/v1/admin/ledger", {"authorization": "Bearer t"})),
            (["balance", *agent], None),
            (["leases", *agent], None),
        ]
        for argv, raw in calls:
            result = CliRunner().invoke(cli, ["client", *argv])
            assert result.exit_code == 0, (argv, result.stdout)
            printed = json.loads(result.stdout)
            if raw is not None:  # the same call without the client: the bodies must be equal
                method, path, headers = raw
                assert printed == httpx.request(method, url + path, headers=headers).json()
        assert printed == []  # no leases yet
        again = CliRunner().invoke(cli, ["client", "deposit", "--agent-id", "cli-a", "--amount", "5000",
                                         "--idempotency-key", "k1", *admin])  # fmt: skip
        assert json.loads(again.stdout) == {
            "transfer_id": json.loads(again.stdout)["transfer_id"],
            "created": False,
            "agent_id": "cli-a",
            "wallet_micro": 5000,
            "escrow_micro": 0,
        }

"""Anyone: health, Prometheus metrics, Maxwell's EAR key."""

from __future__ import annotations

import base64
import os

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..deps import Control
from ..wire import EarKey, Health

router = APIRouter(tags=["service"])


@router.get("/healthz", response_model=Health)
def healthz(control: Control) -> Health:
    with Session(control.ledger.engine) as session:
        session.execute(select(1))
    return Health(
        status="ok",
        db=control.ledger.engine.dialect.name,
        audit_queue=control.audits.depth(),
        process=os.getpid(),
        audit_lead=control.lead.leading,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
def prometheus(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/ear-key", response_model=EarKey)
def ear_key(control: Control) -> EarKey:
    """Maxwell's public key for the EAR JWTs, as a JWK (OKP, Ed25519)."""
    x = base64.urlsafe_b64encode(bytes.fromhex(control.ear_key.public_hex)).rstrip(b"=").decode()
    return EarKey(kty="OKP", crv="Ed25519", x=x, kid=control.ear_key.keyid, alg="EdDSA")

"""Pieces the physics adversaries share: an invented answer, and a token stream paced like an
honest one while the process does something else (sleeps, spins, hashes, burns matmuls)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import numpy as np

from ..observer.host import this_device
from ..protocol.keys import AgentKey
from ..protocol.lease import GenerateJob, Lease
from ..protocol.receipt import (
    ReceiptClaims,
    claims_for_lease,
    embedding_output,
    fingerprint_size,
    sign_receipt,
    token_output,
)
from ..prover.stream import current_sink
from ..registry.models import Registry
from ..registry.profiles import ProfileStore

DEFAULT_PACE_S = 0.03


def honest_pace(model_id: str) -> float:
    """The honest per-token interval, which any agent can measure for itself; the profile if there."""
    profile = ProfileStore().get(model_id, this_device())
    return profile.interval_s.median if profile else DEFAULT_PACE_S


def garbage_claims(lease: Lease, registry: Registry, tokens: list[int] | None = None) -> ReceiptClaims:
    """Well-formed claims with invented content, built from public reference values only (the
    leased model is never loaded)."""
    ref = registry.reference(lease.model_id)
    job = lease.job
    rng = np.random.default_rng(secrets.randbits(64))
    if isinstance(job, GenerateJob):
        tokens = tokens if tokens is not None else rng.integers(1000, ref.vocab, job.max_new_tokens).tolist()
        output = token_output(tokens, ref.vocab)
    else:
        matrix = rng.standard_normal((len(job.texts), ref.hidden)).astype(np.float32)
        output = embedding_output(matrix / np.linalg.norm(matrix, axis=1, keepdims=True))
    fingerprints = secrets.token_bytes(fingerprint_size(lease))
    return claims_for_lease(lease, ref.weights_digest, output, fingerprints, secrets.token_hex(32))


def stream_paced(tokens: list[int], pace_s: float, fill: Callable[[float], None]) -> None:
    """Stream `tokens` one per `pace_s`, running `fill(deadline)` in between."""
    sink = current_sink()
    for pos, tok in enumerate(tokens):
        fill(time.perf_counter() + pace_s)
        if sink:
            sink(pos, tok)


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.perf_counter()))


def paced_garbage_agent(
    fill: Callable[[float], None], pace_s: float | None = None, before: Callable[[], None] | None = None
) -> Callable[[AgentKey], Callable[[Lease], bytes]]:
    """An agent that never runs the model: invented claims, tokens streamed one per `pace_s`
    (default: the honest pace) with `fill(deadline)` in between, then a validly signed receipt."""

    def answer_for(key: AgentKey) -> Callable[[Lease], bytes]:
        registry = Registry()

        def answer(lease: Lease) -> bytes:
            if before:
                before()
            claims = garbage_claims(lease, registry)
            if isinstance(lease.job, GenerateJob):
                stream_paced(claims.tokens(), honest_pace(lease.model_id) if pace_s is None else pace_s, fill)
            return sign_receipt(claims, key)

        return answer

    return answer_for

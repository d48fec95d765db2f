"""The agent's answer to Maxwell's work probe (protocol.probe): the fingerprint of a fresh random
sequence's final hidden states, computed by the resident model in the leased precision.

Answered on the probe thread of `prover.harness.serve_resident` while a lease may be generating on
the main thread through the same module: the pass runs `unrecorded()`, so no activation recorder
keeps its positions.
"""

from __future__ import annotations

from collections.abc import Callable

from ..protocol.errors import PoiError
from ..protocol.lease import GenerateJob, Lease
from ..protocol.probe import FIRST_JUDGED, ProbeAnswer, parse_probe_request, refuse_probe
from ..registry.fingerprint import encode_chunk
from ..registry.forward import final_hidden
from ..registry.models import LoadedModel
from ..registry.unrecorded import unrecorded

ModelFor = Callable[[Lease], LoadedModel]


def stand_in_lease(model_id: str, precision: str) -> Lease:
    """A lease naming only a model and a precision, for provers that pick their model per lease."""
    return Lease.issue("probe", model_id, GenerateJob(prompt="probe", max_new_tokens=1), precision=precision)  # type: ignore[arg-type]


def probe_fingerprint(model: LoadedModel, ids: list[int], fingerprint_k: int) -> bytes:
    """What an honest agent answers: the chunk fingerprint of positions FIRST_JUDGED.. of `ids`."""
    vocab = model.reference.vocab
    if any(not 0 <= i < vocab for i in ids):
        raise ValueError(f"probe ids: expected token ids in [0, {vocab}), got {min(ids)}..{max(ids)}")
    with unrecorded():
        hidden = final_hidden(model, ids)
    return encode_chunk(hidden[FIRST_JUDGED:], fingerprint_k)


def probe_answerer(model_for: ModelFor) -> Callable[[bytes], bytes]:
    """A serve_resident `prober`: one probe line in, one answer line out (an error line when the
    probe cannot be answered; never an exception, the lease goes on)."""

    def answer(raw: bytes) -> bytes:
        try:
            req = parse_probe_request(raw)
        except ValueError as exc:
            return refuse_probe(raw, str(exc))
        try:
            model = model_for(stand_in_lease(req.model_id, req.precision))
            data = probe_fingerprint(model, list(req.ids), req.fingerprint_k)
        except (PoiError, ValueError, KeyError, RuntimeError) as exc:
            return ProbeAnswer(req.lease_id, req.number, error=f"{type(exc).__name__}: {exc}").line()
        return ProbeAnswer(req.lease_id, req.number, data).line()

    return answer

"""The decode schedule a generation receipt claims: how the prover fed its answer to the model.

A native audit replays the answer the way the prover decoded it (verifier.audit, "decode replay"):
the prompt in one pass, then pass after pass on a KV cache. Rounding in low precision depends on
how many positions a pass computes together, so the replay must feed the same blocks to reproduce an
honest prover's values bit for bit. Plain decoding feeds one token per pass, and a receipt that says
nothing is replayed that way. A speculative decoder feeds blocks (the last kept token plus the draft's
proposals, some of them then refused) and declares them in its receipt's `runtime` under
`"decode"`: `{"passes": [[fed, kept], ...]}`, one pair per pass after the prompt's, where `kept` rows
(the first ones) became committed positions. A prover that decodes the lease in a batch declares
`{"batch": rows, "width": columns}`: how many rows every pass computed (other leases, or filler),
and the width its prompts were left-padded to (the lease's own prompt length when it was not
padded); the rounding of a pass depends on its shape, not on the other rows' values.

Like everything in a receipt this is a claim. It only says how to replay; a false one makes the
replay differ, never pass: the replayed values are Maxwell's reference model's, whatever the
schedule. Its size is bounded so a claim cannot make the audit arbitrarily expensive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

RUNTIME_KEY = "decode"
MAX_FED = 64  # positions one declared pass may feed: a speculative block is a handful
MAX_ROWS = 64  # rows one declared batch may hold
MAX_PAD = 4096  # columns of left padding a declared batch may add to the lease's prompt


@dataclass(frozen=True)
class DecodeSchedule:
    """Passes after the prompt's, as (fed positions, kept rows); `declared` False: not in the receipt
    (plain decoding: one token per pass)."""

    passes: tuple[tuple[int, int], ...]
    declared: bool
    batch: int = 1  # rows every pass computed
    pad: int = 0  # columns of left padding before the lease's prompt

    @property
    def batched(self) -> bool:
        return self.batch > 1 or self.pad > 0

    @classmethod
    def plain(cls, tokens: int) -> DecodeSchedule:
        """One token per pass: what the prover SDK's decoding loop does (the last token is never fed)."""
        return cls(((1, 1),) * max(0, tokens - 1), False)

    @property
    def fed(self) -> int:
        return sum(f for f, _ in self.passes)

    def as_runtime(self) -> dict[str, list[list[int]]]:
        return {"passes": [[f, k] for f, k in self.passes]}


def batch_declaration(rows: int, width: int) -> dict[str, int]:
    """What a batching prover writes under `runtime["decode"]` (see the module docstring)."""
    return {"batch": rows, "width": width}


def schedule_of(runtime: Mapping[str, object], tokens: int, prompt_len: int = 0) -> DecodeSchedule:
    """The schedule a receipt's `runtime` declares for an answer of `tokens` tokens to a prompt of
    `prompt_len` tokens, or plain decoding when it declares none. Raises ValueError (expected vs
    got) for a declaration that cannot describe this answer."""
    if RUNTIME_KEY not in runtime:
        return DecodeSchedule.plain(tokens)
    claim = runtime[RUNTIME_KEY]
    if isinstance(claim, Mapping) and "passes" not in claim and ("batch" in claim or "width" in claim):
        return _batched(claim, tokens, prompt_len)
    passes = claim.get("passes") if isinstance(claim, Mapping) else None
    if not isinstance(passes, list) or len(passes) > max(0, tokens - 1):
        raise ValueError(
            f"decode schedule: expected {{'passes': [[fed, kept], ...]}} with at most {max(0, tokens - 1)} "
            f"passes, got {str(claim)[:80]!r}"
        )
    out = []
    for i, p in enumerate(passes):
        ok = isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p)
        if not ok or not 1 <= p[1] <= p[0] <= MAX_FED:
            raise ValueError(
                f"decode schedule: expected pass {i} as [fed, kept] with 1 <= kept <= fed <= {MAX_FED}, "
                f"got {str(p)[:40]!r}"
            )
        out.append((p[0], p[1]))
    kept = sum(k for _, k in out)
    if kept != max(0, tokens - 1):
        raise ValueError(
            f"decode schedule: expected kept rows summing to {max(0, tokens - 1)} (every output token but "
            f"the last is fed once), got {kept}"
        )
    return DecodeSchedule(tuple(out), True)


def _batched(claim: Mapping[str, object], tokens: int, prompt_len: int) -> DecodeSchedule:
    """Plain decoding in a declared batch: `batch` rows, prompts left-padded to `width` columns."""
    rows, width = claim.get("batch", 1), claim.get("width", prompt_len)
    if set(claim) - {"batch", "width"}:
        raise ValueError(
            f"decode schedule: expected only 'batch' and 'width' beside no 'passes', got {sorted(claim)}"
        )
    if type(rows) is not int or not 1 <= rows <= MAX_ROWS:
        raise ValueError(
            f"decode schedule: expected 'batch' an integer in 1..{MAX_ROWS}, got {str(rows)[:40]!r}"
        )
    if type(width) is not int or not prompt_len <= width <= prompt_len + MAX_PAD:
        raise ValueError(
            f"decode schedule: expected 'width' an integer in {prompt_len}..{prompt_len + MAX_PAD} (the "
            f"prompt's {prompt_len} tokens plus left padding), got {str(width)[:40]!r}"
        )
    return DecodeSchedule(DecodeSchedule.plain(tokens).passes, True, rows, width - prompt_len)

"""`poi policy explain`: each verification tier's numbers for one lease, and the tier it gets."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .common import JsonOpt, _bad_input, _quiet, app, out

policy_app = typer.Typer(help="Maxwell's verification tiers and audit probabilities.")
app.add_typer(policy_app, name="policy")
# A labelled estimate, used only to explain when no profile is at hand (the watts per core are the
# Energy Wallet's own figure, economics.energy): debits are by measured joules, never by this.
FLOPS_PER_JOULE_ESTIMATE = 5e9


def lease_energy_estimate(model: str, tokens: int) -> tuple[float, str]:
    """Joules one lease of `tokens` new tokens takes here: from this device's resident profile
    (CPU-seconds x an estimated watts per core) if there is one, else from the model's FLOPs."""
    from ..economics.energy import WATTS_PER_CORE_ESTIMATE
    from ..observer.evidence import resident_profile_key
    from ..registry.models import Registry
    from ..registry.profiles import ProfileStore

    profile = ProfileStore().get(model, resident_profile_key())
    if profile is not None:
        cpu_s = profile.decode_cpu_s_per_token.mean * tokens
        return cpu_s * WATTS_PER_CORE_ESTIMATE, (
            f"resident profile: {cpu_s:.2f} CPU-s x {WATTS_PER_CORE_ESTIMATE:g} W per core (estimate)"
        )
    flops = Registry().reference(model).flops_per_token * tokens
    return (
        flops / FLOPS_PER_JOULE_ESTIMATE,
        f"{flops:.3g} FLOPs at {FLOPS_PER_JOULE_ESTIMATE:.0e} FLOP/J (estimate)",
    )


@policy_app.command("explain")
def explain(
    model: Annotated[str, typer.Option(help="model id of the lease")],
    value: Annotated[float, typer.Option(help="the bid's value for this lease (money units)")],
    stake: Annotated[float, typer.Option(help="stake the agent escrows for it (money units)")] = 0.0,
    tokens: Annotated[int, typer.Option(help="new tokens of the lease")] = 64,
    headroom_j: Annotated[float, typer.Option(help="the node's thermal headroom (J)")] = 1e6,
    price_per_j: Annotated[float, typer.Option(help="what Maxwell charges per measured joule")] = 0.0001,
    json_out: JsonOpt = False,
) -> None:
    """Each tier's layers, audit probability, verification energy and the expected loss of a cheat;
    then the tier this lease gets on a node with this headroom."""
    _quiet()
    from ..economics import Tier, TierPolicy
    from ..protocol.errors import PoiError

    if tokens < 1:
        raise _bad_input(f"--tokens: expected at least 1, got {tokens}")
    try:
        energy_j, basis = lease_energy_estimate(model, tokens)
        policy = TierPolicy()
        kw = dict(value=value, stake=stake, lease_energy_j=energy_j, price_per_j=price_per_j)
        tiers = {t: policy.at_tier(t, **kw) for t in Tier}
        chosen = policy.choose(headroom_j=headroom_j, **kw)
    except (PoiError, ValueError) as exc:
        raise _bad_input(str(exc)) from None
    if json_out:
        print(
            json.dumps(
                {
                    "lease_energy_basis": basis,
                    "tiers": {t.value: c.as_dict() for t, c in tiers.items()},
                    "chosen": chosen.as_dict(),
                },
                indent=2,
            )
        )
        return
    out.print(
        f"lease: {model}, {tokens} tokens, ~{energy_j:.2f} J ({basis}); value {value:g}, stake {stake:g}"
    )
    table = Table()
    for col in ("tier", "layers", "audit p", "verification J", "cheat's expected loss"):
        table.add_column(col)
    for t, c in tiers.items():
        loss = f"{c.deterrence.expected_loss_if_cheating:.4g}" if c.deterrence else "—"
        table.add_row(
            t.value, ", ".join(c.layers), f"{c.audit_probability:.4f}", f"{c.verification_energy_j:.3f}", loss
        )
    out.print(table)
    if tiers[Tier.MEDIUM].deterrence:
        out.print(f"medium: {tiers[Tier.MEDIUM].deterrence.reason}")
    out.print(
        f"[bold]chosen: {chosen.tier.value}{' (DEFERRED)' if chosen.deferred else ''}[/] — {chosen.reason}"
    )

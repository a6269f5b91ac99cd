"""What a later invoice carries for a period already finalized: the signed difference between
the period rated on its usage now and rated on what was billed (pure: no I/O, Decimal only).

Both sides are rated in full with the period's own prices (``billing.rating.rate``) and
compared line by line, so quotas, the risk adjustment and any non-linear price come out
exactly as the period would have cost with all its usage on time; the lines sum to
``rate(now).total - rate(billed).total``.

- A period whose counters only grew (late usage): one ``late_usage`` line, the net difference.
- A period with any counter lower than billed (a correction): one ``usage_correction`` line
  per line code whose amount or quantity changed (``corrects`` names it: ``cpu``,
  ``risk_adjustment``, ...), each signed; a negative one is a credit.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from billing.model import EXACT, USAGE_CORRECTION, InvoiceLine, add_up, plain
from billing.rating import Usage, late_usage_line, rate
from billing.tiers import Tier


def is_correction(billed: Usage, now: Usage) -> bool:
    """True when some counter is lower now than what was billed."""
    return any(change < 0 for change in now.delta(billed).values())


def _by_code(lines: Iterable[InvoiceLine]) -> dict[str, list[InvoiceLine]]:
    grouped: dict[str, list[InvoiceLine]] = {}
    for line in lines:
        grouped.setdefault(line.code, []).append(line)
    return grouped


def correction_lines(period: str, tier: Tier, billed: Usage, now: Usage) -> list[InvoiceLine]:
    """The lines that bring ``period`` from what was billed (``billed``) to ``now``, at
    ``tier``'s prices; they sum to exactly ``rate(tier, now).total - rate(tier, billed).total``."""
    if not is_correction(billed, now):
        return [late_usage_line(period, tier, billed, now)]
    before = _by_code(rate(tier, billed).lines)
    after = _by_code(rate(tier, now).lines)
    codes = [*after, *(code for code in before if code not in after)]
    lines = []
    for code in codes:
        old, new = before.get(code, []), after.get(code, [])
        amount = EXACT.subtract(add_up(ln.amount for ln in new), add_up(ln.amount for ln in old))
        old_qty = add_up(ln.quantity for ln in old)
        new_qty = add_up(ln.quantity for ln in new)
        if amount == 0 and old_qty == new_qty:
            continue
        what = (new or old)[0].description
        lines.append(
            InvoiceLine(
                code=USAGE_CORRECTION,
                description=(
                    f"correction for {period} ({tier.name}): {what}, "
                    f"{plain(old_qty)} -> {plain(new_qty)}"
                ),
                quantity=Decimal(1),
                unit_price=amount,
                amount=amount,
                period=period,
                corrects=code,
            )
        )
    return lines

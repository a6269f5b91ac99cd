"""The HTML invoice and usage report: everything escaped, nothing external, all the facts on the
page, and a real headless Chromium renders them to a PNG that is not blank."""

from __future__ import annotations

import json
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from bench.ledger_load import publish_usage
from billing.alerts import store as alert_store
from billing.alerts.model import AlertRecord, Crossing, Threshold
from billing.credits import CreditLot
from billing.db import billing_db, transaction
from billing.invoice_store import Billed
from billing.invoicing import ChargedElsewhere, LateUsage, settled_invoice
from billing.model import Invoice, InvoiceStatus
from billing.rating import Usage
from billing.render.invoice_html import DASH, amount_text, day, render_invoice_html
from billing.render.report_html import PeriodUsage, UsageReport, render_report_html
from billing.tiers import load_tiers
from common.settings import load_settings
from schemas.periods import Period
from tests.fixtures.seeds import correction, event, priced_tier, rated_invoice
from tests.support import REPO
from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.events import make_event

ROOT = REPO
NASTY = "acme<script>alert('x')</script>&co"
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}


# --- checks on the HTML text --------------------------------------------------------------


class _Balance(HTMLParser):
    """Fails on a closing tag that does not match the open one."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def visible_text(page: str) -> str:
    """The page's text (entities decoded), after checking every tag is closed in order."""
    parser = _Balance()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed {parser.stack}"
    return " ".join(parser.text)


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    for external in ("http:", "https:", "//", "src=", "<link", "@import", "url(", "<script"):
        assert external not in lowered.replace("<!doctype html>", ""), external


# --- Chromium and the PNG it writes -------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium (installed once by deploy/ensure-chromium if it is missing)."""
    out = subprocess.run(
        [str(ROOT / "deploy" / "ensure-chromium")],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def screenshot(chromium: str, page: Path, png: Path, height: int = 1400) -> None:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--screenshot={png}",
                f"--window-size=1000,{height}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert png.is_file(), proc.stderr[-2000:]


def _unfilter(raw: bytes, width: int, height: int, bpp: int) -> Iterator[bytes]:
    """PNG scanline filters undone (RFC 2083, section 6)."""
    stride = width * bpp
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                row[i] = (row[i] + row[i - bpp]) & 0xFF
        elif kind == 2:
            row = bytearray((a + b) & 0xFF for a, b in zip(row, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = row[i - bpp] if i >= bpp else 0
                row[i] = (row[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = row[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                row[i] = (row[i] + pred) & 0xFF
        yield bytes(row)
        prev = row


def png_rows(path: Path) -> tuple[int, list[list[tuple[int, int, int]]]]:
    """Width and RGB rows of an 8-bit RGB or RGBA PNG, decoded with zlib and struct only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    rows = []
    for row in _unfilter(zlib.decompress(b"".join(idat)), width, height, bpp):
        rows.append(list(zip(row[0::bpp], row[1::bpp], row[2::bpp], strict=True)))
    return width, rows


def assert_not_blank(png: Path) -> None:
    """Ink (text, rules) over much of the page, and colour (badges, bars): the CSS applied."""
    width, rows = png_rows(png)
    thirds = [rows[: len(rows) // 3], rows[len(rows) // 3 : 2 * len(rows) // 3]]
    for part in thirds:
        ink = sum(1 for row in part for px in row if min(px) < 200)
        assert ink > 0.005 * width * len(part), f"only {ink} dark pixels in a third of the page"
    colour = sum(1 for row in rows for px in row if max(px) - min(px) > 80)
    assert colour > 500, f"only {colour} coloured pixels"


# --- the invoice --------------------------------------------------------------------------


def _invoice(status: InvoiceStatus = InvoiceStatus.finalized) -> Invoice:
    tiers = load_tiers(None)
    usage = {
        "cpu_ms": 3_600_000,
        "network_bytes": 1_234_567_890,
        "api_calls": 52_000,
        "tool_executions": 900,
        "data_retrievals": 4_000,
        "egress_scans": 1_300,
        "policy_checks": 80_000,
        "violations": 12,
    }
    late = LateUsage(
        Billed(NASTY, "2025-01", "basic", Usage(cpu_ms=100), "INV-1", None),
        tiers["basic"],
        Usage(cpu_ms=5_100, api_calls=20),
    )
    moment = datetime(2025, 3, 1, 2, 30, tzinfo=UTC)
    return settled_invoice(
        invoice_id="INV-1740796200000-9f3a1c2b",
        tenant_id=NASTY,
        period=Period(2025, 2),
        tier=tiers["professional"],
        usage_row=usage,
        late=[late],
        status=status,
        created_at=moment,
        finalized_at=moment if status is not InvoiceStatus.draft else None,
        due_days=30,
    )[0]


def _alerts(tenant: str, period: str) -> list[AlertRecord]:
    """Two alerts of the invoice's tenant and period (one sent, one still retried) and one of
    another period, which the invoice must not show."""
    crossed = datetime(2025, 2, 20, 9, 15, tzinfo=UTC)

    def record(key: str, observed: str, period: str = period, sent: bool = True) -> AlertRecord:
        return AlertRecord(
            event_id=f"alert_{key[:6]}{period}",
            tenant_id=tenant,
            period=period,
            threshold=key,
            source="tenant",
            observed=observed,
            crossed_at=crossed,
            attempts=2 if sent else 4,
            status="delivered" if sent else "pending",
            last_error=None if sent else "HTTP 503 from <hooks>:443",
            last_attempt_at=crossed,
            delivered_at=crossed + timedelta(seconds=3) if sent else None,
        )

    return [
        record("quota_percent:cpu_ms:80", "3000000"),
        record("amount_usd:300.00", "312.40", sent=False),
        record("amount_usd:999.00", "999.99", period="2024-12"),
    ]


def test_invoice_page_shows_every_fact_escaped() -> None:
    invoice = _invoice()
    alerts = _alerts(invoice.tenant_id, invoice.period)
    page = render_invoice_html(invoice, now=invoice.created_at, alerts=alerts)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert_self_contained(page)
    text = visible_text(page)
    assert NASTY in text  # shown as written, not interpreted
    for line in invoice.lines:
        assert amount_text(line.amount) in text, line
    assert "late usage for 2025-01" in text and "2025-01" in text
    assert amount_text(invoice.total) == "348.99" and "348.99" in text
    assert day(invoice.due_date) == "31 Mar 2025" and "31 Mar 2025" in text
    assert "finalized" in text and "professional" in text
    assert "1,234.5" not in text and "≈ 1,177.3757" in text  # MiB, rounded and saying so
    for quota in invoice.quotas:
        assert f"{quota.utilisation_pct} %" in text
    assert "Usage alerts sent" in text and "80% of the cpu_ms quota" in text
    assert "sent  20 Feb 2025 09:15 UTC" in text and "3,000,000" in text
    assert "300.00 usd for the period" in text and "312.40 usd" in text
    assert "pending  4 attempt(s): HTTP 503 from <hooks>:443" in text
    assert "999.00" not in text  # another period's alert
    assert "Usage alerts" not in visible_text(render_invoice_html(invoice, now=invoice.created_at))


def test_invoice_page_status_is_the_one_in_force() -> None:
    invoice = _invoice()
    overdue = visible_text(render_invoice_html(invoice, now=invoice.due_date + timedelta(days=1)))
    assert "overdue" in overdue and "finalized" not in overdue.split("Invoice", 2)[1][:60]
    draft = _invoice(InvoiceStatus.draft)
    text = visible_text(render_invoice_html(draft, [], now=draft.created_at))
    assert "Draft: the period is still open" in text and "Total so far" in text
    assert "Quota utilisation" not in text  # quotas=[] overrides the invoice's own report


def test_invoice_renders_in_chromium(chromium: str, tmp_path: Path) -> None:
    invoice = _invoice()
    page = tmp_path / "invoice.html"
    alerts = _alerts(invoice.tenant_id, invoice.period)
    page.write_text(render_invoice_html(invoice, now=invoice.created_at, alerts=alerts))
    screenshot(chromium, page, tmp_path / "invoice.png", height=2000)
    assert_not_blank(tmp_path / "invoice.png")
    # the alerts' delivery labels (amber: still retried; teal: sent), drawn by their CSS
    _, rows = png_rows(tmp_path / "invoice.png")
    for colour in ((0xE0, 0xA1, 0x00), (0x1F, 0x7A, 0x8C)):
        near = sum(
            1
            for row in rows
            for px in row
            if max(abs(a - b) for a, b in zip(px, colour, strict=True)) < 12
        )
        assert near > 200, f"{near} pixels of {colour}: the alerts section is not drawn"


def _priced_invoice() -> Invoice:
    """A month on graduated API calls, packaged tool executions and a 100 usd minimum
    commitment the usage does not reach."""
    usage = {"cpu_ms": 3_600_000, "api_calls": 12_345, "tool_executions": 250}
    return rated_invoice(
        "INV-1740796200000-5c0ffee5", "scale-co", Period(2025, 2), priced_tier(), usage
    )


def test_invoice_page_shows_price_ranges_packages_and_the_true_up(
    chromium: str, tmp_path: Path
) -> None:
    invoice = _priced_invoice()
    html_page = render_invoice_html(invoice, now=invoice.created_at)
    assert_self_contained(html_page)
    text = visible_text(html_page)
    for label, units, price, amount in (
        (f"units 0 {DASH} 1,000", "1,000", "0.01", "10.00"),
        (f"units 1,000 {DASH} 10,000", "9,000", "0.005", "45.00"),
        ("units 10,000 and above", "2,345", "0.001", "2.345"),  # exact: the line rounds once
        ("packages of 100", "3", "0.50", "1.50"),
    ):
        assert f"{label} {units} {price} {amount}" in text, text
    assert "API calls, graduated" in text and "57.35" in text  # 57.345 rounded once
    assert "Minimum commitment true-up 30.79" in text  # 100.00 - 69.21 rated
    assert "minimum commitment 100.00 per period (rated 69.21)" in text
    assert amount_text(invoice.total) == "100.00" and "Total due (USD) 100.00" in text
    page = tmp_path / "priced.html"
    page.write_text(html_page)
    screenshot(chromium, page, tmp_path / "priced.png")
    assert_not_blank(tmp_path / "priced.png")


def _void_and_replacement() -> tuple[Invoice, Invoice]:
    """``_invoice()`` voided (a reason to escape) and the reissue that replaced it, which
    credits a late line of its period charged elsewhere."""
    old = _invoice()
    new_id = "INV-1748736000000-0a1b2c3d"
    voided = old.model_copy(
        update={
            "status": InvoiceStatus.void,
            "void_reason": "tier was wrong <b>not bold</b>",
            "voided_by": "carol",
            "voided_at": datetime(2025, 6, 1, 9, tzinfo=UTC),
            "replaced_by": new_id,
        }
    )
    credit = ChargedElsewhere(
        old.period, "INV-1743465600000-77aa88bb", "late_usage", Decimal("4.20")
    ).line()
    replacement = old.model_copy(
        update={
            "invoice_id": new_id,
            "replaces": old.invoice_id,
            "lines": [*old.lines, credit],
            "total": old.total - Decimal("4.20"),
            "created_at": datetime(2025, 6, 1, 9, 5, tzinfo=UTC),
        }
    )
    return voided, replacement


def _void_tint(png: Path) -> int:
    """Pixels of the faint red the VOID mark is drawn in (over white or the soft grey)."""
    _, rows = png_rows(png)
    return sum(
        1 for row in rows for r, g, b in row if r >= 228 and 12 <= r - g <= 45 and abs(g - b) <= 10
    )


def test_void_invoice_and_its_replacement_show_the_mark_and_the_links(
    chromium: str, tmp_path: Path
) -> None:
    voided, replacement = _void_and_replacement()
    now = datetime(2025, 6, 2, tzinfo=UTC)
    void_page = render_invoice_html(voided, now=now)
    assert "<b>not bold</b>" not in void_page and "&lt;b&gt;not bold&lt;/b&gt;" in void_page
    assert_self_contained(void_page)
    text = " ".join(visible_text(void_page).split())
    assert "VOID" in text and "void" in text
    assert "by carol: tier was wrong <b>not bold</b>." in text and "01 Jun 2025" in text
    show = "( pf-metering invoices show {} -f html )"  # text nodes joined by spaces
    assert (
        f"Replaced by invoice {replacement.invoice_id} {show.format(replacement.invoice_id)}."
        in text
    )
    assert "Total (void)" in text and "Void: nothing is due" in text
    assert "Due by" not in text
    new_text = " ".join(visible_text(render_invoice_html(replacement, now=now)).split())
    assert f"Replaces void invoice {voided.invoice_id} {show.format(voided.invoice_id)}" in new_text
    assert "VOID" not in new_text
    assert "Corrections given back" in new_text and "-4.20" in new_text
    assert "INV-1743465600000-77aa88bb" in new_text
    pngs = {}
    for name, invoice in (("plain", _invoice()), ("void", voided), ("new", replacement)):
        page = tmp_path / f"{name}.html"
        page.write_text(render_invoice_html(invoice, now=now))
        pngs[name] = tmp_path / f"{name}.png"
        screenshot(chromium, page, pngs[name])
        assert_not_blank(pngs[name])
    plain, void, new = (_void_tint(pngs[n]) for n in ("plain", "void", "new"))
    assert void > plain + 5_000 and new < void // 4, (plain, void, new)


def test_report_lists_a_void_invoice_with_its_replacement() -> None:
    voided, replacement = _void_and_replacement()
    tier = load_tiers(None)["professional"]
    period = Period.parse(voided.period)
    report = UsageReport(
        NASTY,
        [PeriodUsage.of(period, tier, None)],
        [voided, replacement],
        "usage data as of now",
        datetime(2025, 6, 2, tzinfo=UTC),
    )
    text = " ".join(visible_text(render_report_html(report)).split())
    assert f"void: tier was wrong <b>not bold</b>; replaced by {replacement.invoice_id}" in text
    assert f"replaces void {voided.invoice_id}" in text
    assert "1 (+1 void)" in text  # the void one is not counted as invoiced
    assert amount_text(replacement.total) in text and amount_text(voided.total) in text
    invoiced = text.split("Invoiced (USD)")[1].split()[0]
    assert invoiced == amount_text(replacement.total)


def _credited(credit: tuple[CreditLot, ...], violations_billed: int) -> Invoice:
    """A basic March invoice carrying January corrected down (violations to 0)."""
    tiers = load_tiers(None)
    correction = LateUsage(
        Billed(NASTY, "2025-01", "basic", Usage(violations=violations_billed), "INV-1", None),
        tiers["basic"],
        Usage(),
    )
    moment = datetime(2025, 4, 1, 2, tzinfo=UTC)
    return settled_invoice(
        invoice_id=f"INV-credit-{violations_billed}",
        tenant_id=NASTY,
        period=Period(2025, 3),
        tier=tiers["basic"],
        usage_row={"api_calls": 1_000},
        late=[correction],
        status=InvoiceStatus.finalized,
        created_at=moment,
        finalized_at=moment,
        due_days=30,
        credit=credit,
    )[0]


def test_an_invoice_with_a_credit_line_and_a_carried_balance_renders_in_chromium(
    chromium: str, tmp_path: Path
) -> None:
    carried = _credited(
        (CreditLot("INV-0", "2024-12", Decimal("25.00")),), 300
    )  # 51 - 300: 249 carried
    applied = _credited(
        (CreditLot("INV-0", "2024-12", Decimal("25.00")),), 20
    )  # 51 - 20, 25 applied
    assert (carried.total, carried.credit_balance) == (Decimal("0.00"), Decimal("274.00"))
    assert (applied.total, applied.credit_balance) == (Decimal("6.00"), Decimal("0.00"))
    for invoice, billed, facts in (
        (carried, 300, ["-300.00", "Credit carried to your balance", "249.00", "274.00"]),
        (applied, 20, ["-20.00", "Credit balance applied", "-25.00", "6.00"]),
    ):
        page = render_invoice_html(invoice, now=invoice.created_at)
        assert_self_contained(page)
        text = visible_text(page)
        assert "Late usage and corrections from earlier periods" in text
        assert f"correction for 2025-01 (basic): policy violations, {billed} -> 0" in text
        assert "usage_correction" in text and "Credit balance remaining" in text
        for fact in facts:
            assert fact in text, fact
        path = tmp_path / f"{invoice.invoice_id}.html"
        path.write_text(page)
        screenshot(chromium, path, tmp_path / f"{invoice.invoice_id}.png")
        assert_not_blank(tmp_path / f"{invoice.invoice_id}.png")


# --- the usage report ---------------------------------------------------------------------

MONTHS = [Period(2025, m) for m in range(3, 8)]


def _usage_history(data_env: dict[str, str]) -> None:
    """Five months of usage for acme-corp (growing), professional from 2025-06, all billed."""
    events: list[dict[str, Any]] = []
    for n, period in enumerate(MONTHS, start=1):
        moment = int((period.start + timedelta(days=3)).timestamp() * 1_000_000)
        events += [
            make_event(
                "acme-corp",
                session_id=f"s-{n}-{i}",
                occurred_at=moment,
                cpu_ms=400_000 * n,
                api_calls=3_000 * n * n,
                network_bytes=2**20 * 90 * n,
            )
            for i in range(n)
        ]
    cfg = load_settings()
    publish_usage(cfg, events)
    run_cli("tenants", "set-tier", "acme-corp", "professional", "--from", "2025-06", check=True)
    run_cli("bill", "--quiet", check=True)
    # an alert crossed in 2025-05 (the watcher records only open periods; this one was then)
    eighty = Threshold(quota_percent=Decimal(80), counter="api_calls")
    crossing = Crossing("acme-corp", "2025-05", "basic", eighty, "tier", Decimal(9), Decimal(10))
    with billing_db(cfg.billing_db, 10) as con, transaction(con):
        [sent] = alert_store.record_crossings(con, [crossing], datetime(2025, 5, 20, tzinfo=UTC))
        alert_store.mark_delivered(con, sent, datetime(2025, 5, 20, 0, 0, 2, tzinfo=UTC))


def test_report_charts_usage_and_lists_invoices(
    data_env: dict[str, str], chromium: str, tmp_path: Path
) -> None:
    _usage_history(data_env)
    out = tmp_path / "report.html"
    proc = run_cli(
        "report", "acme-corp", "--from", "2025-02", "--to", "2025-08", "-o", str(out), check=True
    )
    assert "usage data as of" in proc.stderr  # how fresh, like every reading command
    page = out.read_text()
    assert_self_contained(page)
    text = visible_text(page)
    assert page.count("<svg") == 9  # events and the eight counters
    tiers = load_tiers(None)
    in_force = ["basic"] * 4 + ["professional"] * 3  # 2025-02 .. 2025-08
    quota_marks = sum(len(tiers[t].quotas.model_dump(exclude_none=True)) for t in in_force)
    assert quota_marks and page.count("stroke-dasharray") == quota_marks
    listed = json.loads(run_cli("invoices", "acme-corp", "-f", "json", check=True).stdout)
    in_range = [i for i in listed if "2025-02" <= i["period"] <= "2025-08"]
    assert [i["period"] for i in in_range] == [f"2025-0{m}" for m in range(3, 9)]
    for invoice in in_range:  # 2025-08 has no usage: the base fee only
        assert invoice["invoice_id"] in text and invoice["total"] in text
    assert not [i for i in listed if i not in in_range and i["invoice_id"] in text]
    assert "not invoiced yet" in text  # 2025-02, before the tenant's first usage
    assert "professional" in text and "basic" in text
    assert "Mar 25" in text and "Aug 25" in text
    assert "Usage alerts" in text and "80% of the api_calls quota" in text
    assert "sent  20 May 2025 00:00 UTC" in text
    png = tmp_path / "report.png"
    screenshot(chromium, out, png)
    assert_not_blank(png)


def test_report_rejects_bad_ranges_and_unknown_tenants(data_env: dict[str, str]) -> None:
    assert_user_error(
        run_cli("report", "acme-corp", "--from", "2025-05", "--to", "2025-03"), "after"
    )
    assert_user_error(run_cli("report", "acme-corp", "--from", "2025-13"), "invalid period")
    assert_user_error(run_cli("report", "nobody", "--to", "2025-03"), "unknown tenant")
    assert_user_error(
        run_cli("report", "acme-corp", "--from", "2000-01", "--to", "2025-01"), "at most"
    )


def test_report_shows_corrections_credits_and_the_balance(
    data_env: dict[str, str], chromium: str, tmp_path: Path
) -> None:
    publish_usage(load_settings(), [event("acme-corp", "2025-01", violations=100)])
    run_cli("bill", "--quiet", "--as-of", "2025-02-01T02:00:00Z", check=True)
    fixed = correction("acme-corp", "2025-01", violations=-100)
    fixed.update(reason="detector <b>bug</b>", corrects_event_id="evt-42")
    publish_usage(load_settings(), [fixed])
    run_cli("bill", "--quiet", "--as-of", "2025-05-01T02:00:00Z", check=True)
    out = tmp_path / "report.html"
    run_cli(
        "report", "acme-corp", "--from", "2025-01", "--to", "2025-04", "-o", str(out), check=True
    )
    page = out.read_text()
    assert_self_contained(page)
    text = visible_text(page)
    listed = json.loads(run_cli("invoices", "acme-corp", "-f", "json", check=True).stdout)
    shown = [(i["period"], i["total"], i["credit_balance"]) for i in listed]
    assert shown == [
        ("2025-01", "150.00", "0.00"),
        ("2025-02", "0.00", "50.00"),  # 50 - 100: 50 carried
        ("2025-03", "0.00", "0.00"),  # 50 applied
        ("2025-04", "50.00", "0.00"),
    ]
    for header in ("Earlier periods", "Credit", "Credit balance", "Credit balance (USD)"):
        assert header in text
    assert "-100.00" in text and "-50.00" in text
    # the correction event itself: its period, signed deltas, reason (escaped), what it corrects
    applied = " ".join(text.split("Usage corrections")[1].split("Usage alerts")[0].split())
    assert applied.startswith("Period Applied Changes Reason 2025-01 ")
    assert "UTC violations -100 detector <b>bug</b> corrects evt-42" in applied
    assert "<b>bug</b>" not in page
    png = tmp_path / "report.png"
    screenshot(chromium, out, png)
    assert_not_blank(png)

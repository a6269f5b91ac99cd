"""A small stateful Stripe over HTTP for flow and fault tests (stripe-mock keeps no state).

It serves the calls the push and the void make (customers create/search/retrieve, invoices
create/search/retrieve/finalize/void/delete, invoice lines, invoice items, credit notes
create/list), with Stripe's rules for them (only a draft is finalized, edited or deleted; only
an open or uncollectible invoice is voided; a credit note only for an open or paid invoice and
at most what it still carries, a paid one's credited to the customer's balance, refunded or
out of band to the cent), and honours ``Idempotency-Key``
as Stripe does: the first response for a key is stored and replayed (errors included, with
``Idempotent-Replayed: true``); the same key with other parameters gets 400
``idempotency_error``; requests rejected before they ran (validation, injected failures) store
nothing. Faults are injected through the Python handle:

- ``fail``: answer an error status without running the call (what a rate limiter or an
  overloaded front end does);
- ``drop``: run the call, store its response, then close the connection without answering
  (a response lost on the way back);
- ``error_after``: run the call, then answer and store a 500 (Stripe replays such 500s).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from billing.stripe.webhook_server import KeepAliveHandler

FaultKind = Literal["fail", "drop", "error_after"]
Obj = dict[str, Any]

_QUERY_CLAUSE = re.compile(r"^metadata\['([^']+)'\]:'((?:[^'\\]|\\.)*)'$")


@dataclass(frozen=True)
class Call:
    """One request as received (1-based ``number`` over all requests, retries included)."""

    number: int
    method: str
    path: str
    params: Obj
    idempotency_key: str | None
    body: bytes
    headers: dict[str, str]


@dataclass
class Fault:
    kind: FaultKind
    when: Callable[[Call], bool]
    status: int = 500
    times: int | None = 1  # None: every matching call

    def take(self, call: Call) -> bool:
        if self.times == 0 or not self.when(call):
            return False
        if self.times is not None:
            self.times -= 1
        return True


class StripeErr(Exception):
    def __init__(
        self, status: int, kind: str, message: str, *, code: str | None = None, stored: bool = True
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.code = code
        self.stored = stored  # False: rejected before the call ran; nothing to replay

    def body(self) -> Obj:
        err: Obj = {"type": self.kind, "message": self.message}
        if self.code:
            err["code"] = self.code
        return {"error": err}


def parse_form(body: str) -> Obj:
    """Stripe's form encoding: ``metadata[k]=v`` becomes nested dicts."""
    out: Obj = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _int(params: Obj, name: str) -> int:
    try:
        return int(params[name])
    except (KeyError, ValueError) as exc:
        raise StripeErr(
            400, "invalid_request_error", f"Invalid integer: {name}", stored=False
        ) from exc


@dataclass
class StripeState:
    customers: dict[str, Obj] = field(default_factory=dict)
    invoices: dict[str, Obj] = field(default_factory=dict)
    items: dict[str, Obj] = field(default_factory=dict)
    credit_notes: dict[str, Obj] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self.ids):06d}"


class FakeStripe:
    """State, idempotency store, call log and faults; ``handle`` is the whole API."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.state = StripeState()
        self.idempotency: dict[str, tuple[str, int, Obj]] = {}
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.url = ""

    # --- the Python handle -------------------------------------------------------------------

    def inject(
        self,
        kind: FaultKind,
        *,
        at: int | None = None,
        when: Callable[[Call], bool] | None = None,
        status: int = 500,
        times: int | None = 1,
    ) -> None:
        """Fault the call numbered ``at`` (counting from the next request) or matching ``when``."""
        if at is not None:
            target = len(self.calls) + at
            self.faults.append(Fault(kind, lambda c: c.number == target, status, 1))
        else:
            self.faults.append(Fault(kind, when or (lambda c: True), status, times))

    def expire_idempotency_keys(self) -> None:
        """What 24 hours do: Stripe forgets every key."""
        with self.lock:
            self.idempotency.clear()

    def invoices_for(self, invoice_id: str) -> list[Obj]:
        return [
            i for i in self.state.invoices.values() if i["metadata"].get("invoice_id") == invoice_id
        ]

    def customers_for(self, tenant_id: str) -> list[Obj]:
        return [
            c for c in self.state.customers.values() if c["metadata"].get("tenant_id") == tenant_id
        ]

    def total_of(self, stripe_invoice_id: str) -> int:
        """The invoice's total as Stripe computes it (the sum of its lines, in cents)."""
        return int(self._invoice_view(self.state.invoices[stripe_invoice_id])["total"])

    def items_of(self, stripe_invoice_id: str) -> list[Obj]:
        return [i for i in self.state.items.values() if i["invoice"] == stripe_invoice_id]

    def pending_items(self) -> list[Obj]:
        return [i for i in self.state.items.values() if i["invoice"] is None]

    def credit_notes_of(self, stripe_invoice_id: str) -> list[Obj]:
        return [n for n in self.state.credit_notes.values() if n["invoice"] == stripe_invoice_id]

    def pay(self, stripe_invoice_id: str) -> None:
        """What the customer paying does (Stripe then sends ``invoice.paid``)."""
        with self.lock:
            invoice = self.state.invoices[stripe_invoice_id]
            assert invoice["status"] == "open", invoice["status"]
            invoice["status"] = "paid"
            invoice["amount_paid"] = self._invoice_view(invoice)["total"]

    # --- the API -----------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, params: Obj, body: bytes, headers: dict[str, str]
    ) -> tuple[Call, int, Obj, bool, bool]:
        """Return (the call, status, body, replayed, drop the connection)."""
        with self.lock:
            call = Call(
                len(self.calls) + 1,
                method,
                path,
                params,
                headers.get("idempotency-key"),
                body,
                headers,
            )
            self.calls.append(call)
            fault = next((f for f in self.faults if f.take(call)), None)
            if fault is not None and fault.kind == "fail":
                err = StripeErr(fault.status, _error_kind(fault.status), "injected failure")
                return call, fault.status, err.body(), False, False
            status, out, replayed = self._idempotent(call, fault)
            return call, status, out, replayed, fault is not None and fault.kind == "drop"

    def _idempotent(self, call: Call, fault: Fault | None) -> tuple[int, Obj, bool]:
        key = call.idempotency_key if call.method == "POST" else None
        fingerprint = json.dumps([call.method, call.path, call.params], sort_keys=True)
        if key is not None and key in self.idempotency:
            first, status, body = self.idempotency[key]
            if first != fingerprint:
                err = StripeErr(
                    400,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters "
                    "they were first used with.",
                )
                return 400, err.body(), False
            return status, body, True
        try:
            status, body = 200, self._route(call)
            stored = True
        except StripeErr as err:
            status, body, stored = err.status, err.body(), err.stored
        if fault is not None and fault.kind == "error_after":
            status, body = fault.status, StripeErr(fault.status, "api_error", "injected").body()
        if key is not None and stored:
            self.idempotency[key] = (fingerprint, status, body)
        return status, body, False

    def _route(self, call: Call) -> Obj:
        m, p, q = call.method, call.path, call.params
        if (
            self.api_key is not None
            and call.headers.get("authorization") != f"Bearer {self.api_key}"
        ):
            given = call.headers.get("authorization", "").removeprefix("Bearer ")
            raise StripeErr(
                401, "invalid_request_error", f"Invalid API Key provided: {given}", stored=False
            )
        parts = p.strip("/").split("/")[1:]  # drop "v1"
        routes: dict[tuple[str, ...], Callable[[], Obj]] = {
            ("POST", "customers"): lambda: self._create_customer(q),
            ("GET", "customers", "search"): lambda: self._search(self.state.customers, q, p),
            ("GET", "invoices", "search"): lambda: self._search(self.state.invoices, q, p),
            ("POST", "invoices"): lambda: self._create_invoice(q),
            ("POST", "invoiceitems"): lambda: self._create_item(q),
        }
        if (m, *parts) in routes:
            return routes[(m, *parts)]()
        if m == "GET" and len(parts) == 2 and parts[0] == "customers":
            return self._get(self.state.customers, parts[1])
        if m == "GET" and len(parts) == 2 and parts[0] == "invoices":
            return self._invoice_view(self._get(self.state.invoices, parts[1]))
        if m == "GET" and len(parts) == 3 and parts[::2] == ["invoices", "lines"]:
            return self._lines(self._get(self.state.invoices, parts[1]), q, p)
        if m == "POST" and len(parts) == 3 and parts[::2] == ["invoices", "finalize"]:
            return self._finalize(self._get(self.state.invoices, parts[1]), q)
        if m == "POST" and len(parts) == 3 and parts[::2] == ["invoices", "void"]:
            return self._void(self._get(self.state.invoices, parts[1]))
        if m == "DELETE" and len(parts) == 2 and parts[0] == "invoices":
            return self._delete(self._get(self.state.invoices, parts[1]))
        if (m, *parts) == ("POST", "credit_notes"):
            return self._create_credit_note(q)
        if (m, *parts) == ("GET", "credit_notes"):
            return self._list_credit_notes(q, p)
        raise StripeErr(404, "invalid_request_error", f"Unrecognized request URL ({m}: {p})")

    @staticmethod
    def _get(table: dict[str, Obj], object_id: str) -> Obj:
        if object_id not in table:
            raise StripeErr(
                404,
                "invalid_request_error",
                f"No such object: '{object_id}'",
                code="resource_missing",
            )
        return table[object_id]

    def _create_customer(self, q: Obj) -> Obj:
        cid = self.state.new_id("cus")
        self.state.customers[cid] = {
            "id": cid,
            "object": "customer",
            "name": q.get("name"),
            "description": q.get("description"),
            "metadata": dict(q.get("metadata", {})),
            "balance": 0,
            "livemode": False,
        }
        return self.state.customers[cid]

    def _search(self, table: dict[str, Obj], q: Obj, path: str) -> Obj:
        clauses = [c.strip() for c in str(q.get("query", "")).split(" AND ")]
        wanted = []
        for clause in clauses:
            match = _QUERY_CLAUSE.match(clause)
            if not match:
                raise StripeErr(400, "invalid_request_error", f"bad query {clause!r}", stored=False)
            wanted.append((match.group(1), re.sub(r"\\(.)", r"\1", match.group(2))))
        found = [o for o in table.values() if all(o["metadata"].get(k) == v for k, v in wanted)]
        limit = int(q.get("limit", 10))
        views = [self._invoice_view(o) if o["object"] == "invoice" else o for o in found]
        return {
            "object": "search_result",
            "data": views[:limit],
            "has_more": len(found) > limit,
            "next_page": None,
            "url": path,
        }

    def _create_invoice(self, q: Obj) -> Obj:
        customer = q.get("customer")
        if customer not in self.state.customers:
            raise StripeErr(
                400, "invalid_request_error", f"No such customer: '{customer}'", stored=False
            )
        iid = self.state.new_id("in")
        invoice: Obj = {
            "id": iid,
            "object": "invoice",
            "customer": customer,
            "currency": q.get("currency", "usd"),
            "status": "draft",
            "auto_advance": q.get("auto_advance") == "true",
            "collection_method": q.get("collection_method", "charge_automatically"),
            "days_until_due": int(q["days_until_due"]) if "days_until_due" in q else None,
            "description": q.get("description"),
            "metadata": dict(q.get("metadata", {})),
            "livemode": False,
        }
        self.state.invoices[iid] = invoice
        if q.get("pending_invoice_items_behavior") != "exclude":
            for item in self.pending_items():
                if item["customer"] == customer:
                    item["invoice"] = iid  # what Stripe does with pending items by default
        return self._invoice_view(invoice)

    def _create_item(self, q: Obj) -> Obj:
        customer = q.get("customer")
        if customer not in self.state.customers:
            raise StripeErr(
                400, "invalid_request_error", f"No such customer: '{customer}'", stored=False
            )
        invoice_id = q.get("invoice")
        if invoice_id is not None:
            invoice = self._get(self.state.invoices, invoice_id)
            if invoice["status"] != "draft":
                raise StripeErr(
                    400,
                    "invalid_request_error",
                    f"Invoice {invoice_id} is no longer editable",
                    code="invoice_not_editable",
                )
            if invoice["customer"] != customer:
                raise StripeErr(400, "invalid_request_error", "customer mismatch", stored=False)
        item_id = self.state.new_id("ii")
        item = {
            "id": item_id,
            "object": "invoiceitem",
            "amount": _int(q, "amount"),
            "currency": q.get("currency"),
            "customer": customer,
            "description": q.get("description"),
            "metadata": dict(q.get("metadata", {})),
            "invoice": invoice_id,
            "livemode": False,
        }
        self.state.items[item_id] = item
        return item

    def _line(self, item: Obj) -> Obj:
        return {
            "id": "il_" + item["id"],
            "object": "line_item",
            "amount": item["amount"],
            "currency": item["currency"],
            "description": item["description"],
            "metadata": item["metadata"],
            "invoice": item["invoice"],
            "parent": {
                "type": "invoice_item_details",
                "invoice_item_details": {"invoice_item": item["id"]},
            },
        }

    def _invoice_view(self, invoice: Obj) -> Obj:
        lines = [self._line(i) for i in self.items_of(invoice["id"])]
        total = sum(line["amount"] for line in lines)
        notes = self.credit_notes_of(invoice["id"])
        pre = sum(n["amount"] for n in notes if n["type"] == "pre_payment")
        post = sum(n["amount"] for n in notes if n["type"] == "post_payment")
        paid = invoice.get("amount_paid", 0)
        open_or_draft = invoice["status"] in ("draft", "open", "uncollectible")
        return {
            **invoice,
            "subtotal": total,
            "total": total,
            "amount_paid": paid,
            "amount_due": max(total - pre, 0) if open_or_draft else 0,
            "pre_payment_credit_notes_amount": pre,
            "post_payment_credit_notes_amount": post,
            "lines": {
                "object": "list",
                "data": lines[:10],
                "has_more": len(lines) > 10,
                "url": f"/v1/invoices/{invoice['id']}/lines",
            },
        }

    def _lines(self, invoice: Obj, q: Obj, path: str) -> Obj:
        return _page([self._line(i) for i in self.items_of(invoice["id"])], q, path)

    def _finalize(self, invoice: Obj, q: Obj) -> Obj:
        if invoice["status"] != "draft":
            raise StripeErr(
                400,
                "invalid_request_error",
                "This invoice is already finalized, you can't re-finalize a non-draft invoice.",
                code="invoice_not_editable",
            )
        # As Stripe does: an invoice with nothing to pay is paid as it is finalized.
        nothing_due = self._invoice_view(invoice)["amount_due"] == 0
        invoice["status"] = "paid" if nothing_due else "open"
        if "auto_advance" in q:
            invoice["auto_advance"] = q["auto_advance"] == "true"
        return self._invoice_view(invoice)

    def _void(self, invoice: Obj) -> Obj:
        if invoice["status"] not in ("open", "uncollectible"):
            raise _refused(
                f"You can only void an open or uncollectible invoice; this one is "
                f"{invoice['status']}.",
                code="invoice_not_editable" if invoice["status"] == "draft" else None,
            )
        invoice["status"] = "void"
        return self._invoice_view(invoice)

    def _delete(self, invoice: Obj) -> Obj:
        if invoice["status"] != "draft":
            raise _refused("You can only delete draft invoices; void a finalized one instead.")
        del self.state.invoices[invoice["id"]]
        for item_id in [i["id"] for i in self.items_of(invoice["id"])]:
            del self.state.items[item_id]  # a deleted draft's items go with it
        return {"id": invoice["id"], "object": "invoice", "deleted": True}

    def _create_credit_note(self, q: Obj) -> Obj:
        invoice = self._get(self.state.invoices, str(q.get("invoice")))
        if invoice["status"] not in ("open", "paid"):
            raise _refused(
                f"Credit notes can only be issued for open or paid invoices; this one is "
                f"{invoice['status']}."
            )
        view = self._invoice_view(invoice)
        amount = _int(q, "amount")
        credited = (
            view["pre_payment_credit_notes_amount"] + view["post_payment_credit_notes_amount"]
        )
        if amount <= 0 or amount > view["total"] - credited:
            raise _refused(
                f"The credit note amount ({amount}) must be positive and at most what the "
                f"invoice has left to credit ({view['total'] - credited}).",
            )
        split = {
            k: int(q.get(k, 0)) for k in ("credit_amount", "refund_amount", "out_of_band_amount")
        }
        post = invoice["status"] == "paid"
        if post and sum(split.values()) != amount:
            raise _refused(
                "For post-payment credit notes the sum of the refund, credit and outside of "
                "Stripe amounts must equal the credit note total.",
            )
        if split["credit_amount"]:
            self.state.customers[invoice["customer"]]["balance"] -= split["credit_amount"]
        note_id = self.state.new_id("cn")
        self.state.credit_notes[note_id] = {
            "id": note_id,
            "object": "credit_note",
            "invoice": invoice["id"],
            "customer": invoice["customer"],
            "currency": invoice["currency"],
            "amount": amount,
            "total": amount,
            **split,
            "memo": q.get("memo"),
            "metadata": dict(q.get("metadata", {})),
            "status": "issued",
            "type": "post_payment" if post else "pre_payment",
            "livemode": False,
        }
        return self.state.credit_notes[note_id]

    def _list_credit_notes(self, q: Obj, path: str) -> Obj:
        notes = list(self.state.credit_notes.values())
        if "invoice" in q:
            notes = [n for n in notes if n["invoice"] == q["invoice"]]
        return _page(notes, q, path)


def _page(objects: list[Obj], q: Obj, path: str) -> Obj:
    """One page of a Stripe list: ``limit`` objects after ``starting_after``."""
    if "starting_after" in q:
        ids = [o["id"] for o in objects]
        objects = objects[ids.index(q["starting_after"]) + 1 :]
    limit = int(q.get("limit", 10))
    return {
        "object": "list",
        "data": objects[:limit],
        "has_more": len(objects) > limit,
        "url": path,
    }


def _refused(message: str, code: str | None = None) -> StripeErr:
    """A 400 for a call Stripe's rules refuse (it ran, so a retry with its key replays it)."""
    return StripeErr(400, "invalid_request_error", message, code=code)


def _error_kind(status: int) -> str:
    return {429: "rate_limit_error"}.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )


class _Handler(KeepAliveHandler):
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        params = parse_form(body.decode() if method == "POST" else url.query)
        headers = {k.lower(): v for k, v in self.headers.items()}
        call, status, payload, replayed, drop = self.server.fake.handle(
            method, url.path, params, body, headers
        )
        if drop:
            self.close_connection = True
            return
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", f"req_{call.number}")
        if replayed:
            self.send_header("Idempotent-Replayed", "true")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeStripe) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake


@contextmanager
def running(fake: FakeStripe) -> Iterator[str]:
    """Serve ``fake`` on a free loopback port; yields its base URL."""
    server = _Server(fake)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

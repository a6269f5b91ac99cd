"""Bad input: decoder fuzzing (oversized values and floods through the real broker:
tests/broker/consumer/test_bad_input_floods.py).

The fuzz tests feed generated batches to ``schemas.prepare.prepare_batch`` (the worker's
decode-validate-columnise step, whatever fast path it takes) and hold it to independent
references: per record, ``Codec.decode`` + ``validate`` (for arbitrary bytes), and the rules of
docs/spec.md ("The usage event", "Invalid events") written out again here (for arbitrary field
values). Nothing may raise; every record is counted or dead-lettered exactly once, raw bytes
kept; every dead letter names a reason of ``schemas.validation.REASONS``; what is counted is
exactly what was sent. Hypothesis draws each batch: some inputs from its own strategies
(shrinkable), and a seeded ``random.Random`` (its seed drawn by Hypothesis: a failure prints a
blob that replays it) that expands the batch to volume. ``make test`` checks over 12k inputs,
``PF_SOAK=1`` over 120k.
"""

from __future__ import annotations

import math
import os
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from schemas.codec import COUNTERS, MAX_VALUE_BYTES, SINGLE_OBJECT_MAGIC, DecodeError
from schemas.codec import default_codec as _codec
from schemas.prepare import Record, prepare_batch
from schemas.validation import REASONS, reason_code, validate
from tests.support.events import make_event

SOAK = os.environ.get("PF_SOAK") == "1"
FUZZ_INPUTS = 60_000 if SOAK else 6_000  # per fuzz test (two of them)
CODEC = _codec()
VERSIONS = sorted(CODEC.versions)
HEADERS = [CODEC.versions[v].header for v in VERSIONS]
NOW = int(datetime(2025, 6, 15, 12, tzinfo=UTC).timestamp() * 1_000_000)
HOUR = 3_600_000_000
INT64 = (-(2**63), 2**63 - 1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FIRST_INSTANT = int(datetime(1, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)  # year 1
# docs/spec.md, "The usage event"; used with fullmatch
TENANT_SPEC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", re.ASCII)
STRING_FIELDS = ("event_id", "tenant_id", "session_id", "source")
FIELDS = (*STRING_FIELDS, "occurred_at", *COUNTERS, "risk_score")
SENT = ("tenant_id", "event_id", "session_id", "occurred_at", *COUNTERS, "risk_score")
ALPHABET = string.ascii_letters + string.digits + "._:-" + " /\\'\";é\u202e\x00\t🙂"
WILD_STRINGS = ["", " ", "a" * 128, "a" * 129, "é" * 128, "\x00", "-acme", "a b", "a/b", "ação"]
WILD_LONGS = [-1, INT64[0], INT64[1], -(10**12)]
WILD_RISKS = [math.nan, math.inf, -math.inf, -0.0, 1.0, math.nextafter(1.0, 2.0), -1e-300]
WILD_MOMENTS = [NOW + 300_000_000, NOW + 300_000_001, FIRST_INSTANT, FIRST_INSTANT - 1, *INT64]

# --- inputs: a seeded Random expands each batch to volume ----------------------------------


def base_event(rnd: random.Random) -> dict[str, Any]:
    return {
        "event_id": f"e-{rnd.getrandbits(40):x}",
        "tenant_id": rnd.choice(["acme", "beta.eu", "t_1:x", "Z9-z"]),
        "session_id": f"s-{rnd.randrange(50)}",
        "occurred_at": NOW - rnd.randrange(90 * 24 * HOUR),
        "source": rnd.choice(["gateway", "policy-kernel", "egress-firewall"]),
        **{c: rnd.randrange(0, 10**6) for c in COUNTERS},
        "risk_score": rnd.choice([None, rnd.random()]),
    }


def wild(rnd: random.Random, name: str) -> Any:
    """Anything the field's Avro type can carry, edge cases first."""
    if name in STRING_FIELDS:
        if rnd.random() < 0.5:
            return rnd.choice(WILD_STRINGS)
        text = "".join(rnd.choice(ALPHABET) for _ in range(rnd.randrange(0, 140)))
        return text
    if name == "risk_score":
        return rnd.choice([*WILD_RISKS, rnd.uniform(-2, 2), None])
    if name == "occurred_at":
        return rnd.choice([*WILD_MOMENTS, rnd.randrange(*INT64), NOW + rnd.randrange(HOUR)])
    return rnd.choice([*WILD_LONGS, rnd.randrange(*INT64), rnd.randrange(10**6)])


def random_event(rnd: random.Random) -> tuple[dict[str, Any], bytes | None, bytes]:
    """(event, key, value): mostly valid, a few fields wild, any published writer version."""
    event = base_event(rnd)
    for name in rnd.sample(FIELDS, k=rnd.choice([0, 0, 0, 1, 1, 2, 3])):
        event[name] = wild(rnd, name)
    roll = rnd.random()
    key = None if roll < 0.05 else b"other" if roll < 0.1 else event["tenant_id"].encode()
    return event, key, CODEC.encode(event, rnd.choice(VERSIONS))


def mutate(rnd: random.Random, value: bytes) -> bytes:
    data = bytearray(value)
    for _ in range(rnd.randint(1, 4)):
        at = rnd.randrange(max(len(data), 1))
        op = rnd.randrange(4)
        if op == 0 and data:
            data[at] ^= rnd.randrange(1, 256)
        elif op == 1:
            del data[at:]
        elif op == 2:
            data[at:at] = rnd.randbytes(rnd.randint(1, 8))
        else:
            data += rnd.randbytes(rnd.randint(1, 16))
    return bytes(data)


def random_value(rnd: random.Random) -> tuple[bytes | None, bytes | None]:
    """Arbitrary bytes, from pure noise to a valid value with a byte flipped."""
    kind = rnd.randrange(7)
    if kind == 0:
        return rnd.choice([None, b"acme"]), rnd.choice([None, rnd.randbytes(rnd.randrange(200))])
    if kind == 1:
        return b"acme", rnd.choice(HEADERS) + rnd.randbytes(rnd.randrange(120))
    if kind == 2:
        return b"acme", SINGLE_OBJECT_MAGIC + rnd.randbytes(8) + rnd.randbytes(rnd.randrange(60))
    if kind == 3:
        size = rnd.randint(MAX_VALUE_BYTES - 16, MAX_VALUE_BYTES + 16)
        return b"acme", rnd.choice(HEADERS) + b"\x02" * (size - 10)
    _event, key, value = random_event(rnd)
    return key, value if kind == 4 else mutate(rnd, value)


# --- inputs: Hypothesis' own strategies (shrinkable) ------------------------------------------

ids = st.one_of(st.text(max_size=140), st.sampled_from(WILD_STRINGS))
tenant_ids = st.one_of(
    st.from_regex(TENANT_SPEC, fullmatch=True), st.text(max_size=140), st.just("acme\n")
)
longs = st.one_of(st.integers(0, 10**9), st.integers(*INT64), st.sampled_from(WILD_LONGS))
risks = st.one_of(st.none(), st.floats(0, 1), st.floats(), st.sampled_from(WILD_RISKS))
moments = st.one_of(
    st.integers(NOW - 400 * 24 * HOUR, NOW + HOUR),
    st.integers(*INT64),
    st.sampled_from(WILD_MOMENTS),
)


@st.composite
def drawn_event(draw: st.DrawFn) -> tuple[dict[str, Any], bytes | None, bytes]:
    event: dict[str, Any] = {
        "event_id": draw(ids),
        "tenant_id": draw(tenant_ids),
        "session_id": draw(ids),
        "occurred_at": draw(moments),
        "source": draw(ids),
        **{c: draw(longs) for c in COUNTERS},
        "risk_score": draw(risks),
    }
    key = draw(st.one_of(st.just(event["tenant_id"].encode()), st.none(), st.binary(max_size=9)))
    return event, key, CODEC.encode(event, draw(st.sampled_from(VERSIONS)))


drawn_value = st.one_of(
    st.tuples(st.none() | st.binary(max_size=9), st.none() | st.binary(max_size=200)),
    st.tuples(st.just(b"acme"), st.builds(bytes.__add__, st.sampled_from(HEADERS), st.binary())),
    drawn_event().map(lambda x: (x[1], x[2])),
)
oldest_allowed = st.none() | st.integers(NOW - 100 * 24 * HOUR, NOW)

# --- the references ---------------------------------------------------------------------------


def reference_outcome(rec: Record, oldest: int | None) -> str | None:
    """None if the record is to be counted, else its reason code: Codec.decode + validate."""
    try:
        event = CODEC.decode(rec.value)
    except DecodeError as exc:
        return exc.reason
    reason = validate(event, NOW, rec.key)
    if reason is not None:
        return reason_code(reason)
    if oldest is not None and event["occurred_at"] < oldest:
        return "past_late_usage_horizon"
    return None


def spec_violations(event: dict[str, Any], key: bytes | None, oldest: int | None) -> set[str]:
    """The rules of docs/spec.md, written out again: every reason ``event`` is invalid for."""
    broken = set()
    for name in ("event_id", "session_id", "source"):
        if not 1 <= len(event[name]) <= 128:
            broken.add(f"invalid_{name}")
    if not TENANT_SPEC.fullmatch(event["tenant_id"]):
        broken.add("invalid_tenant_id")
    if any(event[c] < 0 for c in COUNTERS):
        broken.add("negative_counter")
    risk = event["risk_score"]
    if risk is not None and not (math.isfinite(risk) and 0.0 <= risk <= 1.0):
        broken.add("invalid_risk_score")
    if event["occurred_at"] > NOW + 5 * 60 * 1_000_000:
        broken.add("future_timestamp")
    if event["occurred_at"] < 0:
        broken.add("timestamp_before_1970")
    if key is not None and key != event["tenant_id"].encode():
        broken.add("key_mismatch")
    if oldest is not None and event["occurred_at"] < oldest:
        broken.add("past_late_usage_horizon")
    return broken


def check_batch(
    records: list[Record], oldest: int | None
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Run prepare_batch; every record comes out exactly once, counted or with a reason."""
    batch = prepare_batch(3, records, CODEC, NOW, oldest)
    rows = {row["offset"]: row for row in batch.events.to_pylist()}
    dead = {d.offset: d.reason_code for d in batch.dead}
    assert len(rows) + len(dead) == len(records) == len(rows.keys() | dead.keys())
    assert rows.keys() | dead.keys() == {r.offset for r in records}
    for letter in batch.dead:
        assert letter.reason_code in REASONS and letter.reason.strip(), letter.reason
        source = records[letter.offset]
        assert (letter.key, letter.value) == (source.key, source.value)  # raw, as received
    assert batch.next_offset == records[-1].offset + 1
    seen: set[tuple[str, str]] = set()
    for offset in sorted(rows):
        ident = (rows[offset]["tenant_id"], rows[offset]["event_id"])
        assert rows[offset]["first_in_batch"] == (ident not in seen), offset
        seen.add(ident)
    return rows, dead


Drawn = tuple[list[Any], random.Random, int, int | None]
Batch = tuple[list[Any], random.Random, int | None]  # items, their random source, oldest
Raw = tuple[bytes | None, bytes | None]
Tally = Counter[str]


def fuzz(
    items: st.SearchStrategy[Any],
    random_item: Callable[[random.Random], Any],
    body: Callable[[Batch], int],
) -> int:
    """Run ``body`` over batches until FUZZ_INPUTS records were checked: each batch is a few
    items Hypothesis draws, then 50-400 of ``random_item`` from the drawn random source."""
    checked = 0
    batches = st.tuples(
        st.lists(items, max_size=8),
        st.randoms(use_true_random=True),
        st.integers(50, 400),
        oldest_allowed,
    )

    # No shrinking: a failing batch of hundreds of records would take Hypothesis minutes to
    # shrink; the assertion names the failing record, and the printed blob replays the batch.
    @settings(
        max_examples=max(FUZZ_INPUTS // 200, 20),
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )
    @given(batches)
    def run(drawn: Drawn) -> None:
        nonlocal checked
        listed, rnd, extra, oldest = drawn
        checked += body((listed + [random_item(rnd) for _ in range(extra)], rnd, oldest))

    while checked < FUZZ_INPUTS:
        run()
    return checked


@pytest.mark.soak
def test_fuzzed_bytes_never_crash_and_every_reject_names_its_reason() -> None:
    tally: Tally = Counter()

    def body(batch: Batch) -> int:
        items, _, oldest = batch
        records = [Record(i, key, value) for i, (key, value) in enumerate(items)]
        _rows, dead = check_batch(records, oldest)
        for rec in records:
            assert dead.get(rec.offset) == reference_outcome(rec, oldest), rec
        tally.update(dead.get(r.offset, "counted") for r in records)
        return len(records)

    checked = fuzz(drawn_value, random_value, body)
    print(f"\nfuzzed bytes: {checked} inputs: {dict(tally.most_common())}")
    assert checked >= FUZZ_INPUTS and tally["counted"] and len(tally) >= 8


@pytest.mark.soak
def test_fuzzed_events_are_counted_exactly_when_the_spec_allows() -> None:
    tally: Tally = Counter()

    def body(batch: Batch) -> int:
        items, rnd, oldest = batch
        items += [rnd.choice(items) for _ in range(rnd.randrange(5))]  # sent twice
        records = [Record(i, key, value) for i, (_, key, value) in enumerate(items)]
        rows, dead = check_batch(records, oldest)
        for rec, (event, key, _) in zip(records, items, strict=True):
            broken = spec_violations(event, key, oldest)
            if broken:
                assert dead.get(rec.offset) in broken, (event, key, dead.get(rec.offset), broken)
                continue
            row = rows[rec.offset]
            assert {k: row[k] for k in SENT} == {k: event[k] for k in SENT}, rec
            moment = EPOCH + timedelta(microseconds=event["occurred_at"])
            assert row["period"] == f"{moment.year:04d}-{moment.month:02d}"
        tally.update(dead.get(r.offset, "counted") for r in records)
        return len(records)

    checked = fuzz(drawn_event(), random_event, body)
    print(f"\nfuzzed events: {checked} inputs: {dict(tally.most_common())}")
    # The generator makes about a third of the events valid (33-36% seen): a quarter is
    # the floor that says the fuzz still reaches the counting path, not a statistic.
    assert checked >= FUZZ_INPUTS and tally["counted"] > checked // 4


def test_a_tenant_id_with_a_trailing_newline_is_refused() -> None:
    reason = validate(make_event("acme\n"), int(time.time() * 1_000_000), b"acme\n")
    assert reason is not None and reason_code(reason) == "invalid_tenant_id"


def test_every_reason_is_reachable_through_prepare_batch() -> None:
    """One record per reason code of REASONS, all in one batch (docs/spec.md's classes and ours)."""
    now = NOW
    ok = make_event("acme", occurred_at=now - HOUR)

    def enc(**changes: Any) -> bytes:
        return CODEC.encode({**ok, "event_id": f"e-{sorted(changes)}", **changes})

    cases: dict[str, tuple[bytes | None, bytes | None]] = {
        "not_single_object": (b"acme", b"{}"),
        "oversized": (b"acme", HEADERS[0] + b"\x00" * MAX_VALUE_BYTES),
        "unknown_fingerprint": (b"acme", SINGLE_OBJECT_MAGIC + b"\x00" * 8 + b"\x02"),
        "undecodable_body": (b"acme", enc()[:-3]),
        "invalid_event_id": (b"acme", CODEC.encode({**ok, "event_id": ""})),
        "invalid_tenant_id": (b"a b", enc(tenant_id="a b")),
        "invalid_session_id": (b"acme", enc(session_id="x" * 129)),
        "invalid_source": (b"acme", enc(source="")),
        "negative_counter": (b"acme", enc(violations=-1)),
        "invalid_risk_score": (b"acme", enc(risk_score=math.inf)),
        "future_timestamp": (b"acme", enc(occurred_at=now + 301_000_000)),
        "timestamp_before_1970": (b"acme", enc(occurred_at=-1)),
        "key_mismatch": (b"someone-else", enc()),
        "past_late_usage_horizon": (b"acme", enc(occurred_at=now - 40 * 24 * HOUR)),
        "invalid_correction": (b"acme", enc(kind="correction", cpu_ms=-5, risk_score=None)),
    }
    assert set(cases) == set(REASONS)
    records = [Record(i, k, v) for i, (k, v) in enumerate(cases.values())]
    _rows, dead = check_batch(records, now - 35 * 24 * HOUR)
    assert [dead[i] for i in range(len(records))] == list(cases)

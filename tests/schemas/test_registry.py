"""Schema versions published at run time: stored in the data dir, read by every later
reader, refused when incompatible; ``schemas add`` / ``schemas list`` through the CLI."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from schemas.codec import Codec, discover
from schemas.registry import IncompatibleSchema, Registry
from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.events import make_event

READER: dict[str, Any] = json.loads((Path(discover()[-1].path)).read_text())


def v4(**extra: Any) -> dict[str, Any]:
    schema = copy.deepcopy(READER)
    schema["fields"].append({"name": "zone", "type": "string", "default": "", **extra})
    return schema


def changed(edit: Any) -> dict[str, Any]:
    schema = copy.deepcopy(READER)
    edit(schema)
    return schema


def test_a_published_version_survives_and_decodes_into_the_reader(tmp_path: Path) -> None:
    version, new = Registry(tmp_path).publish(v4())
    assert new and version.schema.version == 4 and version.published_at
    again = Registry(tmp_path)  # a worker that starts later
    assert [v.schema.version for v in again.versions()] == [1, 2, 3, 4]
    assert again.reader.version == 3  # the reader stays the newest built-in version
    writer = Codec([v.schema for v in again.versions()])  # encodes with v4
    event = make_event(tenant="acme")
    value = writer.encode({**event, "region": None, "zone": "z1"}, 4)
    decoded = again.codec.decode(value)
    assert decoded["event_id"] == event["event_id"] and "zone" not in decoded
    # publishing the same schema again is a no-op
    same, new = Registry(tmp_path).publish(v4())
    assert not new and same.schema.version == 4


def test_a_reader_learns_a_version_published_after_it_started(tmp_path: Path) -> None:
    running = Registry(tmp_path)
    assert not running.refresh()
    Registry(tmp_path).publish(v4())
    assert running.refresh() and 4 in running.codec.versions
    assert not running.refresh()


def test_concurrent_publishers_never_share_a_version_number(tmp_path: Path) -> None:
    schemas = [v4() for _ in range(6)]
    for i, s in enumerate(schemas):  # distinct canonical forms: distinct field names
        s["fields"][-1]["name"] = f"zone{i}"
    threads = [threading.Thread(target=Registry(tmp_path).publish, args=(s,)) for s in schemas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = Registry(tmp_path).versions()
    assert [v.schema.version for v in versions] == list(range(1, 10))
    assert len({v.schema.fingerprint for v in versions}) == 9


REFUSED = {
    "another name": (changed(lambda s: s.update(name="Other")), "must be the record"),
    "a field without a default": (
        changed(lambda s: s["fields"].append({"name": "zone", "type": "string"})),
        "added without a default",
    ),
    "a changed type": (
        changed(lambda s: s["fields"][5].update(type="int")),
        "changes type",
    ),
    "a required field removed": (
        changed(lambda s: s["fields"].pop(1)),  # tenant_id: the reader has no default
        "cannot be resolved to the reader",
    ),
    "not a record": ({"type": "string"}, "must be the record"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_incompatible_versions_are_refused(tmp_path: Path, case: str) -> None:
    schema, message = REFUSED[case]
    with pytest.raises(IncompatibleSchema, match=message):
        Registry(tmp_path).publish(schema)
    assert [v.schema.version for v in Registry(tmp_path).versions()] == [1, 2, 3]


def test_cli_add_and_list(tmp_path: Path, data_env: dict[str, str]) -> None:
    good, bad = tmp_path / "v4.avsc", tmp_path / "bad.avsc"
    good.write_text(json.dumps(v4()))
    bad.write_text(json.dumps(REFUSED["a changed type"][0]))
    proc = run_cli("schemas", "add", str(good), env=data_env, check=True)
    assert "as version 4" in proc.stdout
    assert_user_error(run_cli("schemas", "add", str(bad), env=data_env), "changes type")
    assert_user_error(run_cli("schemas", "add", str(tmp_path / "nope")), "cannot read")
    listed = json.loads(run_cli("schemas", "list", "-f", "json", env=data_env, check=True).stdout)
    assert [(v["version"], v["built_in"], v["reader"]) for v in listed] == [
        (1, True, False), (2, True, False), (3, True, True), (4, False, False),
    ]  # fmt: skip
    assert listed[3]["published_at"] and len(listed[3]["fingerprint"]) == 16
    table = run_cli("schemas", "list", env=data_env, check=True).stdout
    assert listed[2]["fingerprint"] in table

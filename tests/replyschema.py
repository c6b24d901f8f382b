"""The JSON Schemas of docs/schemas, loaded once, and the map from a control command to
the schema of its reply. Used by conftest (every reply a test's Control receives, and
every reply the CLI processes of a test received) and by test_schemas."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"
BASE = "https://framebroker.invalid/schemas/v1/"
#: command -> schema file of its successful reply; every error reply is error.json
REPLY = {"endpoints": "endpoints.json", "status": "status.json", "snapshot": "snapshot.json",
         "pause": "paused.json", "resume": "paused.json", "stop": "stop.json",
         "report": "report.json"}


@lru_cache(maxsize=None)
def _registry() -> Registry:
    resources = [(BASE + p.name, Resource.from_contents(json.loads(p.read_text())))
                 for p in sorted(SCHEMA_DIR.glob("*.json"))]
    return Registry().with_resources(resources)


@lru_cache(maxsize=None)
def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = _registry().contents(BASE + name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def check_reply(cmd: str | None, reply: Any) -> None:
    """Raise jsonschema.ValidationError unless ``reply`` is what the document says the
    broker answers to ``cmd`` (None: a command unknown to the caller, so only an error
    reply fits)."""
    if isinstance(reply, dict) and reply.get("ok") is False or cmd not in REPLY:
        validator("error.json").validate(reply)
    else:
        validator(REPLY[cmd]).validate(reply)

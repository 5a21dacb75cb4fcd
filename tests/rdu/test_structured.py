"""The schema-instance generator: every instance validates, the same seed gives the same
text, unsupported keywords are named, and the text round-trips through output tokens."""

from __future__ import annotations

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tierflow.rdu.structured import (
    Unsatisfiable,
    instance,
    rng_for,
    structured_tokens,
    unsupported,
)
from tierflow.tokenizer import decode_output

WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, FR"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["location", "unit"],
    "additionalProperties": False,
}
PYDANTIC = {  # what pydantic's model_json_schema() emits for nested models and Optional
    "$defs": {
        "Item": {"properties": {"name": {"title": "Name", "type": "string", "minLength": 3, "maxLength": 12},
                                "price": {"exclusiveMinimum": 0, "title": "Price", "type": "number"},
                                "tags": {"items": {"type": "string"}, "type": "array", "uniqueItems": True, "maxItems": 4}},
                 "required": ["name", "price"], "title": "Item", "type": "object"},
    },
    "properties": {"items": {"items": {"$ref": "#/$defs/Item"}, "title": "Items", "type": "array", "minItems": 1},
                   "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
                   "when": {"type": "string", "format": "date-time"},
                   "id": {"type": "string", "format": "uuid"}},
    "required": ["items", "when"],
    "title": "Order", "type": "object",
}
TREE = {  # recursive: must end
    "$ref": "#/definitions/node",
    "definitions": {"node": {"type": "object", "properties": {"value": {"type": "integer", "multipleOf": 5},
                                                              "children": {"type": "array", "items": {"$ref": "#/definitions/node"}}},
                             "required": ["value", "children"]}},
}
SCHEMAS = [
    WEATHER, PYDANTIC, TREE,
    {"type": "object"},  # json_object
    {},
    {"type": ["string", "null"]},
    {"type": "number", "minimum": -3.5, "exclusiveMaximum": -3.4},
    {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 12},
    {"type": "number", "multipleOf": 0.25, "minimum": 1, "maximum": 2},
    {"const": {"a": [1, 2]}},
    {"oneOf": [{"type": "boolean"}, {"type": "array", "items": {"enum": ["x", "y", 3]}, "minItems": 2, "maxItems": 2}]},
    {"allOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]}, {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "format": "email"}], "items": False},
    {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 3},
    {"type": "string", "minLength": 40, "maxLength": 41},
    {"type": "object", "properties": {"naïve": {"const": "crème brûlée"}}, "required": ["naïve"]},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_instances_validate(schema) -> None:
    for seed in range(40):
        jsonschema.validate(instance(schema, rng_for(seed, "s")), schema)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), st.sampled_from(SCHEMAS))
def test_any_seed_validates_and_round_trips_through_tokens(seed: int, schema) -> None:
    text, ids = structured_tokens(schema, rng_for(seed, "x"))
    assert decode_output(ids) == text
    assert all(0 <= i < 1 << 32 for i in ids)
    import json
    jsonschema.validate(json.loads(text), schema)


def test_same_seed_same_text_other_seed_other_text() -> None:
    a = structured_tokens(PYDANTIC, rng_for(7, "f"))
    assert a == structured_tokens(PYDANTIC, rng_for(7, "f"))
    assert len({structured_tokens(PYDANTIC, rng_for(s, "f"))[0] for s in range(10)}) > 5


def test_unsupported_keywords_are_named() -> None:
    assert unsupported(WEATHER) is None and unsupported(PYDANTIC) is None
    assert unsupported({"properties": {"pattern": {"type": "string"}}}) is None  # a property called pattern
    assert unsupported({"properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}}}, "schema") == "schema.properties.code.pattern"
    assert unsupported({"$ref": "https://example.com/s.json"}) == "$ref"
    assert unsupported({"not": {"type": "null"}}) == "not"


def test_contradictions_are_unsatisfiable() -> None:
    for schema in ({"type": "integer", "minimum": 5, "maximum": 4}, {"enum": []}, False,
                   {"$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"]}}}):
        with pytest.raises(Unsatisfiable):
            instance(schema, rng_for(1))


def test_hostile_sizes_are_refused_not_built() -> None:
    for schema in ({"type": "array", "minItems": 10**9}, {"type": "string", "minLength": 10**9},
                   {"type": "object", "minProperties": 10**9}):
        with pytest.raises(Unsatisfiable):
            instance(schema, rng_for(1))

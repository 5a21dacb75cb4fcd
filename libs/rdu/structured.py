"""Structured output: a JSON instance of a JSON schema, deterministically from a seed.

The emulator has no weights to constrain, so "constrained decoding" is a small
schema-instance generator: given a schema (a tool's `parameters`, `response_format`'s
`json_schema`) and a seed, it builds a value that validates against the schema, and
`structured_tokens` turns its JSON text into output token ids
(`tierflow.tokenizer.pieces`) that a node streams with its usual timing in place of
drawn words.

Supported: `type` (one or a list), `enum`, `const`, `properties`/`required`/
`additionalProperties`/`minProperties`/`maxProperties`, `items`/`prefixItems`/
`minItems`/`maxItems`/`uniqueItems`, `anyOf`/`oneOf`/`allOf`, `$ref` into the same
document (`#/$defs/...`, `#/definitions/...`, `#`), string `minLength`/`maxLength`/
`format` (date-time, date, time, email, uri, uuid, ipv4, hostname), number and integer
bounds (inclusive and exclusive) and `multipleOf`. Annotations (`title`,
`description`, `default`, `examples`, ...) are ignored as they should be. Keywords
no instance could be generated for by construction (`pattern`, `not`, `if`, ...) are
refused up front by `unsupported`, which names where, so a client gets a 400 rather
than content that does not validate.

Recursive schemas terminate: past `_SHALLOW` levels only required properties,
minimum array lengths and non-recursive branches are taken; a schema that still
cannot end (a required property that is itself, forever) is `Unsatisfiable`.
"""

from __future__ import annotations

import json
import random
from hashlib import blake2b
from typing import Any

from tierflow.tokenizer import OUTPUT_VOCAB
from tierflow.tokenizer.pieces import encode_pieces

__all__ = ["Unsatisfiable", "instance", "rng_for", "structured_text", "structured_tokens", "unsupported"]

_SHALLOW = 4  # deeper than this, generate the least each schema allows
_MAX_DEPTH = 48  # recursion that has not ended by here never will
_MAX_VALUES = 20_000  # values in one instance: a schema asking for more is refused
_MAX_STRING = 1 << 16  # characters of one string (minLength)
_UNSUPPORTED = (
    "pattern", "patternProperties", "not", "if", "then", "else", "dependentSchemas",
    "dependentRequired", "contains", "propertyNames", "unevaluatedProperties",
    "unevaluatedItems", "$dynamicRef", "dependencies",
)
_WORDS = tuple(w.strip() for w in OUTPUT_VOCAB)
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class Unsatisfiable(ValueError):
    """No instance can be generated for the schema (it contradicts itself, or never ends)."""


def unsupported(schema: Any, path: str = "") -> str | None:
    """Where `schema` uses a keyword the generator cannot honour (`path.keyword`), or None.
    Also a `$ref` outside the document."""
    stack: list[tuple[Any, str]] = [(schema, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            here = f"{where}.{key}" if where else key
            if key in _UNSUPPORTED:
                if key == "dependencies" and not value:
                    continue
                return here
            if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
                return here
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                # property names are data, not keywords (a property may be called "pattern")
                stack.extend((sub, f"{here}.{name}") for name, sub in value.items())
            elif key in ("enum", "const", "default", "examples", "description", "title"):
                continue
            elif isinstance(value, (dict, list)):
                stack.append((value, here))
    return None


def rng_for(seed: int, *parts: str) -> random.Random:
    """The generator for one choice: keyed by the request's seed and what it asks for."""
    h = blake2b(digest_size=16)
    h.update(seed.to_bytes(16, "little", signed=True))
    for part in parts:
        h.update(b"\0" + part.encode())
    return random.Random(int.from_bytes(h.digest(), "little"))


def structured_text(schema: Any, rng: random.Random) -> str:
    """Compact JSON (", " and ": " separators, ASCII) of an instance of `schema`."""
    return json.dumps(instance(schema, rng), ensure_ascii=True)


def structured_tokens(schema: Any, rng: random.Random) -> tuple[str, list[int]]:
    """(JSON text, its output token ids) of an instance of `schema`."""
    text = structured_text(schema, rng)
    return text, encode_pieces(text)


def instance(schema: Any, rng: random.Random) -> Any:
    """A value valid against `schema` (a JSON schema as decoded JSON)."""
    return _Gen(schema, rng).value(schema, 0)


class _Gen:
    def __init__(self, root: Any, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.budget = _MAX_VALUES  # a hostile minItems/minProperties must not cost unbounded work

    # ------------------------------------------------------------------ dispatch
    def value(self, schema: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise Unsatisfiable("the schema recurses without end (a required property or item refers back to itself)")
        self.budget -= 1
        if self.budget < 0:
            raise Unsatisfiable(f"the schema asks for an instance of more than {_MAX_VALUES} values")
        if schema is True or schema == {}:
            return self.words(1, 3)
        if schema is False:
            raise Unsatisfiable("a `false` schema admits no value")
        if not isinstance(schema, dict):
            raise Unsatisfiable(f"a schema must be an object or a boolean, got {type(schema).__name__}")
        schema = self.resolve(schema)
        if "allOf" in schema:
            schema = self.merge(schema)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            options = schema["enum"]
            if not isinstance(options, list) or not options:
                raise Unsatisfiable("`enum` must be a non-empty list")
            return self.rng.choice(options)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                branches = schema[key]
                if not isinstance(branches, list) or not branches:
                    raise Unsatisfiable(f"`{key}` must be a non-empty list")
                base = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                branch = self.pick_branch(branches, depth)
                if isinstance(branch, dict) and any(k in base for k in ("type", "properties", "items", "required")):
                    branch = self.merge({"allOf": [base, branch]})
                return self.value(branch, depth + 1)
        kind = self.kind(schema, depth)
        return getattr(self, f"gen_{kind}")(schema, depth)

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        seen = 0
        while "$ref" in schema:
            seen += 1
            if seen > 64:
                raise Unsatisfiable("`$ref` chain does not end")
            ref = schema["$ref"]
            target: Any = self.root
            for part in ref.lstrip("#").strip("/").split("/") if ref not in ("#", "#/") else ():
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                else:
                    raise Unsatisfiable(f"`$ref` {ref!r} does not resolve in the schema")
            if target is True:
                target = {}
            if not isinstance(target, dict):
                raise Unsatisfiable(f"`$ref` {ref!r} does not name a schema")
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if rest else target
        return schema

    def merge(self, schema: dict[str, Any]) -> dict[str, Any]:
        """allOf flattened into one schema: properties merged, `required` united, the
        tightest bounds kept (what generation needs; not a general schema intersection)."""
        out: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema.get("allOf") or []:
            if not isinstance(part, dict):
                continue
            part = self.resolve(part)
            if "allOf" in part:
                part = self.merge(part)
            for key, value in part.items():
                if key == "properties" and isinstance(value, dict):
                    out["properties"] = {**out.get("properties", {}), **value}
                elif key == "required" and isinstance(value, list):
                    out["required"] = sorted(set(out.get("required", [])) | set(value))
                elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties") and key in out:
                    out[key] = max(out[key], value)
                elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties") and key in out:
                    out[key] = min(out[key], value)
                else:
                    out.setdefault(key, value)
        return out

    def pick_branch(self, branches: list[Any], depth: int) -> Any:
        if depth >= _SHALLOW:  # prefer a branch that ends: a scalar, or no reference
            simple = [b for b in branches if isinstance(b, dict) and "$ref" not in b and b.get("type") not in ("object", "array")]
            if simple:
                return simple[0]
        return self.rng.choice(branches)

    def kind(self, schema: dict[str, Any], depth: int) -> str:
        declared = schema.get("type")
        if isinstance(declared, list):
            types = [t for t in declared if t in _TYPES]
            if not types:
                raise Unsatisfiable(f"no known type among {declared}")
            if depth >= _SHALLOW and "null" in types:
                return "null"
            non_null = [t for t in types if t != "null"] or types
            return self.rng.choice(non_null)
        if isinstance(declared, str):
            if declared not in _TYPES:
                raise Unsatisfiable(f"unknown type {declared!r}")
            return declared
        if any(k in schema for k in ("properties", "required", "additionalProperties", "minProperties")):
            return "object"
        if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
            return "array"
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
            return "number"
        return "string"

    # ------------------------------------------------------------------ scalars
    def words(self, least: int, most: int) -> str:
        return " ".join(self.rng.choice(_WORDS) for _ in range(self.rng.randint(least, most)))

    def gen_null(self, schema: dict[str, Any], depth: int) -> None:
        return None

    def gen_boolean(self, schema: dict[str, Any], depth: int) -> bool:
        return self.rng.random() < 0.5

    def gen_string(self, schema: dict[str, Any], depth: int) -> str:
        lo = int(schema.get("minLength", 0))
        if lo > _MAX_STRING:
            raise Unsatisfiable(f"minLength {lo} is more than {_MAX_STRING} characters")
        hi = schema.get("maxLength")
        if hi is not None and int(hi) < lo:
            raise Unsatisfiable(f"maxLength {hi} < minLength {lo}")
        fmt = schema.get("format")
        rng = self.rng
        text = {
            "date-time": lambda: f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
            "date": lambda: f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "time": lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
            "email": lambda: f"{rng.choice(_WORDS)}@{rng.choice(_WORDS)}.example",
            "uri": lambda: f"https://{rng.choice(_WORDS)}.example/{rng.choice(_WORDS)}",
            "hostname": lambda: f"{rng.choice(_WORDS)}.example",
            "uuid": lambda: "%08x-%04x-4%03x-%04x-%012x" % (rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(12), 0x8000 | rng.getrandbits(14), rng.getrandbits(48)),
            "ipv4": lambda: ".".join(str(rng.randint(1, 254)) for _ in range(4)),
        }.get(fmt) if isinstance(fmt, str) else None
        value = text() if text is not None else self.words(1, 4)
        if len(value) < lo:
            value = (value + " " + self.words(lo // 3 + 1, lo // 3 + 1))
        if hi is not None and len(value) > int(hi):
            value = value[: int(hi)]
        if len(value) < lo:
            value = value + "a" * (lo - len(value))
        return value

    def gen_integer(self, schema: dict[str, Any], depth: int) -> int:
        lo, hi = self.bounds(schema, integer=True)
        step = schema.get("multipleOf")
        if isinstance(step, (int, float)) and step > 0:
            first, last = -(-lo // step), hi // step
            if first > last:
                raise Unsatisfiable(f"no multiple of {step} in [{lo}, {hi}]")
            value = int(self.rng.randint(int(first), int(last)) * step)
            return value
        return self.rng.randint(lo, hi)

    def gen_number(self, schema: dict[str, Any], depth: int) -> float | int:
        step = schema.get("multipleOf")
        if isinstance(step, (int, float)) and step > 0:
            lo, hi = self.bounds(schema, integer=False)
            first, last = int(-(-lo // step)), int(hi // step)
            if first > last:
                raise Unsatisfiable(f"no multiple of {step} in [{lo}, {hi}]")
            k = self.rng.randint(first, last)
            return k * step if isinstance(step, int) else round(k * step, 12)
        lo, hi = self.bounds(schema, integer=False)
        value = round(lo + (hi - lo) * self.rng.random(), 2)
        value = min(max(value, lo), hi)
        if (("exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"])
                or ("exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"])):
            value = (lo + hi) / 2
        return value

    def bounds(self, schema: dict[str, Any], *, integer: bool) -> tuple[Any, Any]:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if isinstance(xlo, bool) or isinstance(xhi, bool):  # draft-4 booleans
            xlo = lo if xlo is True else None
            xhi = hi if xhi is True else None
            lo = None if xlo is not None else lo
            hi = None if xhi is not None else hi
        if integer:
            low = [v for v in (lo, None if xlo is None else _floor(xlo) + 1) if v is not None]
            high = [v for v in (hi, None if xhi is None else _ceil(xhi) - 1) if v is not None]
            a = _ceil(max(low)) if low else None
            b = _floor(min(high)) if high else None
        else:
            span = 1e-6
            low = [v for v in (lo, None if xlo is None else xlo + span) if v is not None]
            high = [v for v in (hi, None if xhi is None else xhi - span) if v is not None]
            a = max(low) if low else None
            b = min(high) if high else None
        if a is None and b is None:
            a, b = 0, 100
        elif a is None:
            a = b - 100
        elif b is None:
            b = a + 100
        if a > b:
            raise Unsatisfiable(f"the bounds admit no number ({a} > {b})")
        return a, b

    # ------------------------------------------------------------------ containers
    def gen_object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties") or {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str)]
        extra = schema.get("additionalProperties", True)
        shallow = depth < _SHALLOW
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if name in required or (shallow and self.rng.random() < 0.7):
                out[name] = self.value(sub, depth + 1)
        for name in required:
            if name not in out:
                if extra is False:
                    raise Unsatisfiable(f"required property {name!r} is not allowed (additionalProperties is false)")
                out[name] = self.value(extra if isinstance(extra, dict) else {}, depth + 1)
        least = int(schema.get("minProperties", 0))
        most = schema.get("maxProperties")
        if not props and not required and extra is not False and shallow:
            least = max(least, 1)  # a free-form object (json_object) says something
        n = 0
        while len(out) < least:
            if extra is False:
                raise Unsatisfiable(f"minProperties {least} needs more properties than the schema allows")
            n += 1
            key = self.rng.choice(_WORDS) + (str(n) if n > 1 else "")
            if key not in out and key not in props:
                out[key] = self.value(extra if isinstance(extra, dict) else {"type": "string"}, depth + 1)
        if most is not None and len(out) > int(most):
            keep = [k for k in out if k in required]
            keep += [k for k in out if k not in required][: max(0, int(most) - len(keep))]
            out = {k: out[k] for k in out if k in keep}
        return out

    def gen_array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", {})
        if isinstance(items, list):  # draft-4..2019 tuple form
            prefix, items = items, schema.get("additionalItems", {})
        least = int(schema.get("minItems", 0))
        most = schema.get("maxItems")
        top = least + (3 if depth < _SHALLOW else 0)
        if most is not None:
            if int(most) < least:
                raise Unsatisfiable(f"maxItems {most} < minItems {least}")
            top = min(top, int(most))
        count = self.rng.randint(max(least, min(1, top)) if depth < _SHALLOW else least, top)
        count = max(count, min(len(prefix), top) if depth < _SHALLOW else least)
        out: list[Any] = []
        unique = bool(schema.get("uniqueItems"))
        tries = 0
        while len(out) < count:
            i = len(out)
            sub = prefix[i] if i < len(prefix) else items
            if sub is False:
                break
            value = self.value(sub, depth + 1)
            if unique and value in out:
                tries += 1
                if tries > 32:
                    if len(out) >= least:
                        break
                    raise Unsatisfiable("uniqueItems: could not draw enough distinct items")
                continue
            out.append(value)
        return out


def _floor(x: Any) -> int:
    return int(x // 1)


def _ceil(x: Any) -> int:
    return int(-(-x // 1))

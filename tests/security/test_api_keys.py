"""API keys: salted hashes in configuration, constant-time comparison, rotation with
`not_after`, never logged; `tierflow keys new` round-trips into a tenants file that
authenticates; a router without tenants refuses everyone unless it opts in.

The HTTP part runs registry, one decode node and a router in this event loop over a
private nats-server and calls it with the official `openai` client."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import openai
import pytest
import pytest_asyncio

from tierflow.contracts import subjects
from tierflow.nodehost.serve import serve_node
from tierflow.nodehost.settings import NodeSettings
from tierflow.placement import TenantConfigError, TenantDirectory, hash_api_key, salted_key_hash
from tierflow.runtime import secret_hash
from tierflow.runtime.clock import VirtualClock
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.main import main as registry_main
from tierflow.services.model_registry.settings import Settings as RegistrySettings
from tierflow.services.router.config import load_router_config
from tierflow.services.router.main import main as router_main
from tierflow.services.router.settings import Settings as RouterSettings

REPO = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "who am i"}]


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- pure


def test_a_salted_hash_matches_only_its_key_and_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = salted_key_hash("sk-tf-one")
    assert stored.startswith("sha256:") and stored.count(":") == 2 and "sk-tf-one" not in stored
    assert salted_key_hash("sk-tf-one") != stored  # a fresh salt each time
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(secret_hash.hmac, "compare_digest", spy)
    parsed = secret_hash.SaltedHash.parse(stored)
    assert parsed.matches("sk-tf-one") and not parsed.matches("sk-tf-one ") and not parsed.matches("sk-tf-on")
    assert len(compared) == 3 and all(len(a) == len(b) == 32 for a, b in compared)  # digests, never the keys
    for bad in ("sha256:zz:00", "sha256::" + "0" * 64, "sha256:00:" + "0" * 10):
        with pytest.raises(ValueError) as err:
            secret_hash.SaltedHash.parse(bad)
        assert bad not in str(err.value)


def test_rotation_old_and_new_keys_overlap_until_not_after() -> None:
    clock = VirtualClock(start=1_800_000_000.0)
    config = {"tenants": [{"name": "acme", "api_keys": [
        salted_key_hash("sk-new"),
        {"key": salted_key_hash("sk-old"), "not_after": _iso(1_800_000_100.0)},
        {"key": hash_api_key("sk-legacy-digest")},   # the older unsalted form still reads
    ]}, {"name": "other", "api_keys": [salted_key_hash("sk-other")]}]}  # fmt: skip
    tenants = TenantDirectory.from_config(config, clock=clock)
    assert tenants.authenticate("sk-new").name == "acme" and tenants.authenticate("sk-old").name == "acme"  # type: ignore[union-attr]
    assert tenants.authenticate("sk-other").name == "other" and tenants.authenticate("sk-legacy-digest").name == "acme"  # type: ignore[union-attr]
    assert tenants.authenticate("sk-wrong") is None and tenants.authenticate("sk-wrong") is None  # the second from the cache
    clock.advance(100.0)
    assert tenants.authenticate("sk-old").name == "acme"  # type: ignore[union-attr]  # until not_after, inclusive
    clock.advance(0.5)
    assert tenants.authenticate("sk-old") is None and tenants.authenticate("sk-new").name == "acme"  # type: ignore[union-attr]


def test_the_lookup_cache_holds_neither_keys_nor_their_plain_hashes() -> None:
    import hashlib

    tenants = TenantDirectory.from_config({"tenants": [{"name": "acme", "api_keys": [salted_key_hash("sk-secret")]}]})
    for key in ("sk-secret", "sk-wrong"):
        tenants.authenticate(key)
    cache = tenants._keys._cache  # noqa: SLF001 - what the router keeps in memory per key
    assert len(cache) == 2
    for key in ("sk-secret", "sk-wrong"):
        assert key.encode() not in cache and hashlib.sha256(key.encode()).digest() not in cache
        assert not any(key.encode() in tag for tag in cache)


def test_plain_keys_still_work_with_one_warning_that_never_shows_them(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    tenants = TenantDirectory.from_config({"tenants": [{"name": "acme", "api_keys": ["sk-plain-1", "sk-plain-2", salted_key_hash("sk-h")]}]})
    assert tenants.authenticate("sk-plain-2").name == "acme"  # type: ignore[union-attr]
    warnings = [r for r in caplog.records if "plain text" in r.getMessage()]
    assert len(warnings) == 1 and "tenants[0] ('acme').api_keys[0]" in warnings[0].getMessage()
    assert all("sk-plain" not in r.getMessage() and "sk-plain" not in str(getattr(r, "fields", "")) for r in caplog.records)


def test_a_key_configured_twice_is_refused_without_echoing_it() -> None:
    line = salted_key_hash("sk-twice")
    cases = [
        {"tenants": [{"name": "a", "api_keys": [line]}, {"name": "b", "api_keys": [line]}]},
        {"tenants": [{"name": "a", "api_keys": [line]}, {"name": "b", "api_keys": ["sk-twice"]}]},  # plain vs its salted hash
        {"tenants": [{"name": "a", "api_keys": ["sk-twice"]}, {"name": "b", "api_keys": [line]}]},
    ]
    for config in cases:
        with pytest.raises(TenantConfigError, match=r"tenants\[1\] \('b'\)\.api_keys\[0\]: the same key is already a key of tenant 'a'") as err:
            TenantDirectory.from_config(config)
        assert "sk-twice" not in str(err.value)


def test_a_router_without_tenants_refuses_everyone_unless_it_opts_in() -> None:
    closed = load_router_config("").tenants
    assert closed.authenticate("any-key") is None and closed.authenticate(None) is None
    opened = load_router_config("", allow_anonymous=True).tenants
    assert opened.authenticate("any-key").name == "anonymous" and opened.authenticate(None).name == "anonymous"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- over HTTP


@dataclass
class Keys:
    new: str
    old: str
    expired: str
    base_url: str


def _keys_new(*args: str, process: bool = False) -> dict[str, str]:
    """`tierflow keys new --json ARGS`: as its own process (the command as a person runs it),
    or in this one (the same command, without paying for another interpreter)."""
    if process:
        out = subprocess.run([sys.executable, "-m", "tierflow", "keys", "new", "--json", *args], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)
    from typer.testing import CliRunner

    from tierflow.cli.main import app

    result = CliRunner().invoke(app, ["keys", "new", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def router(private_nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Keys]:
    """A router whose tenants file is made from `tierflow keys new` output: the current key,
    the previous one until an hour from now, and one whose overlap has ended."""
    new = _keys_new("--tenant", "acme", process=True)
    old = _keys_new("--not-after", _iso(time.time() + 3600))
    expired = _keys_new("--not-after", "2020-01-01T00:00:00Z")
    config = tmp_path_factory.mktemp("api-keys") / "tenants.yaml"
    config.write_text(f"tenants:\n  - name: acme\n    api_keys:\n      - {new['entry']}\n      - {old['entry']}\n      - {expired['entry']}\n")
    assert all(k["key"] not in config.read_text() for k in (new, old, expired))
    contexts = {name: ServiceContext(service=name, instance=f"keys-{name}") for name in ("registry", "node", "router")}
    http_port = free_port()
    tasks = [
        asyncio.create_task(registry_main(contexts["registry"], RegistrySettings(nats_url=private_nats_url, grpc_port=free_port(),
                                                                                 fleet=str(REPO / "deploy/examples/fleet.yaml")))),
        asyncio.create_task(serve_node(contexts["node"], NodeSettings(nats_url=private_nats_url, node_id="keys-0"), role="decode",
                                       subject=subjects.node_generate("keys-0"), service="decode-node")),
        asyncio.create_task(router_main(contexts["router"], RouterSettings(nats_url=private_nats_url, http_port=http_port, grpc_port=free_port(),
                                                                           config=str(config)))),
    ]  # fmt: skip
    base_url = f"http://127.0.0.1:{http_port}/v1"
    client = openai.AsyncOpenAI(base_url=base_url, api_key=new["key"], max_retries=0, timeout=30)
    try:
        for _ in range(400):  # until the router has heard the node and can place a request
            for t in tasks:
                if t.done():
                    t.result()
            try:
                await client.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES, max_tokens=2)
                break
            except (openai.APIConnectionError, openai.APIStatusError):
                await asyncio.sleep(0.05)
        yield Keys(new["key"], old["key"], expired["key"], base_url)
    finally:
        for ctx in contexts.values():
            ctx.stopping.set()
        await asyncio.gather(*tasks)


async def test_valid_key_200_wrong_key_401_old_key_until_not_after(router: Keys, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def client(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=router.base_url, api_key=key, max_retries=0, timeout=30)

    for key in (router.new, router.old):  # the new key, and the old one during its overlap
        reply = await client(key).chat.completions.create(model="llama-3.1-8b", messages=MESSAGES, max_tokens=4)
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1  # type: ignore[union-attr]
    for key in ("sk-tf-wrong", router.expired, router.new[:-1]):
        with pytest.raises(openai.AuthenticationError) as err:
            await client(key).chat.completions.create(model="llama-3.1-8b", messages=MESSAGES, max_tokens=4)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        assert key not in str(err.value.body)
    async with httpx2.AsyncClient() as raw:  # no key at all: 401 in OpenAI's error shape
        answer = await raw.post(f"{router.base_url}/chat/completions", json={"model": "llama-3.1-8b", "messages": MESSAGES})
    assert answer.status_code == 401 and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    # What is deployed is not public either: the model list and pages need a key too.
    assert "llama-3.1-8b" in [m.id async for m in client(router.new).models.list()]
    with pytest.raises(openai.AuthenticationError):
        await client("sk-tf-wrong").models.list()
    async with httpx2.AsyncClient() as raw:
        for path in ("/models", "/models/llama-3.1-8b"):
            assert (await raw.get(f"{router.base_url}{path}")).status_code == 401
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert sum(r.getMessage() == "request" for r in caplog.records) >= 5  # the router logged these requests (ok and 401)
    for key in (router.new, router.old, router.expired, "sk-tf-wrong"):
        assert key not in logged

"""A client generated from `/openapi.json` reads well and works: the seed's request through it.

openapi-python-client names a function after each operation id and a module after each
tag; without them a client's functions are named like `get_usage_v1_analytics_usage_get`,
all under `default`.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.answers import SEED_ORGANIZATION, SEED_USER
from usage_api import demo
from usage_api.db import transact

pytestmark = pytest.mark.slow

OPERATIONS = {
    "analytics": {"get_usage"},
    "ingestion": {"post_events"},
    "directory": {"put_partner", "put_organization", "put_user"},
    "operations": {"get_health", "get_readiness"},
}


@pytest.fixture
def generated(app: FastAPI, tmp_path: Path) -> Iterator[ModuleType]:
    """The client package generated from the app's own schema, importable as `client`."""
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(app.openapi()))
    subprocess.run(
        [
            *(sys.executable, "-m", "openapi_python_client", "generate"),
            *("--path", str(spec), "--output-path", str(tmp_path / "client"), "--meta", "none"),
        ],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("client")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.split(".")[0] == "client"]:
            del sys.modules[name]


def test_every_operation_is_named_by_its_id_under_its_tag(
    generated: ModuleType, tmp_path: Path
) -> None:
    api = tmp_path / "client" / "api"
    modules = {
        tag.name: {path.stem for path in tag.glob("*.py") if path.stem != "__init__"}
        for tag in api.iterdir()
        if tag.is_dir() and tag.name != "__pycache__"
    }
    assert modules == OPERATIONS


async def test_the_seeds_requests_through_the_generated_client(
    generated: ModuleType, app: FastAPI, engine: AsyncEngine
) -> None:
    await demo.load_demo(engine)  # type: ignore[arg-type]
    key = await transact(engine, demo.demo_key)  # type: ignore[arg-type]
    get_usage = importlib.import_module("client.api.analytics.get_usage")
    client = generated.Client(base_url="http://test", headers={"X-API-Key": key})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        client.set_async_httpx_client(http)
        http.headers["X-API-Key"] = key
        organization = await get_usage.asyncio_detailed(
            client=client, organization_id=demo.ORGANIZATION_ID
        )
        user = await get_usage.asyncio_detailed(client=client, user_id=demo.USER_ID)
    assert (organization.status_code, json.loads(organization.content)) == (200, SEED_ORGANIZATION)
    assert organization.parsed.to_dict() == SEED_ORGANIZATION
    assert (user.status_code, json.loads(user.content)) == (200, SEED_USER)
    assert user.parsed.to_dict() == SEED_USER

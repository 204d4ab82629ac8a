from __future__ import annotations

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.factories import event, make_key, make_organization


async def test_ingested_events_are_counted_at_once(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine, "Acme Corp")
    key = await make_key(engine, write=True)
    response = await client.post(
        "/v1/usage/events",
        json={
            "events": [
                event(organization_id, quantity=3),
                event(organization_id, "c", type="voice", quantity=60, knowledge_base=True),
            ]
        },
        headers={"X-API-Key": key},
    )
    assert response.json() == {"success": True, "accepted": 2, "duplicates": 0, "conflicts": []}
    response = await client.get(
        "/v1/analytics/usage",
        params={"organization_id": organization_id},
        headers={"X-API-Key": key},
    )
    assert response.json()["usage"]["sms"] == {"outbound": 3, "inbound": 0, "total": 3}
    assert response.json()["usage"]["voice"] == {
        "seconds": 0,
        "kb_seconds": 60,
        "total_seconds": 60,
    }

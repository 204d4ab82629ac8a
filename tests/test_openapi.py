"""The OpenAPI schema, checked against the service itself by Schemathesis.

Every operation is called with cases made from its own schema: the schema's examples,
boundary and invalid values of every parameter and body field, then random ones. Every
answer must be documented (status, content type, headers, body), none may be a 5xx,
invalid data must be rejected and valid data accepted, an unlisted method must be a 405
with `Allow`, and an operation that demands a key must refuse a request without one or
with a wrong one: all of Schemathesis' checks, with its defaults but for one (below).

The database holds the seed's organization and user, which the schema's examples name, so
that cases reach the 200s and 201s too. The cases go with an admin write key, which every
route takes; fewer go with an admin read key (403 on writes) and with no key (401).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.config import SchemathesisConfig
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Receive, Scope, Send

from tests.support.factories import ADMIN, make_key
from usage_api.app import create_app
from usage_api.config import Settings
from usage_api.db import transact
from usage_api.directory import put_organization, put_user
from usage_api.schemas import EXAMPLE_ORGANIZATION_ID, EXAMPLE_USER_ID, OrganizationIn, UserIn

# Requests that fit the schema but break a rule it cannot state get a 400: one of two
# optional parameters is required, a date must exist and a range must not be empty (GET
# usage); an event's organization and user must exist, its quantity fit its type and its
# time not lie ahead (POST events); an email's domain must be able to receive mail (PUT
# users; the field's description says which); a name must not be blank (every PUT).
# Everywhere else valid data is accepted.
SCHEMA_CANNOT_SAY = (
    "/v1/analytics/usage",
    "/v1/usage/events",
    "/v1/users/{user_id}",
    "/v1/partners/{partner_id}",
    "/v1/organizations/{organization_id}",
)


def config(*, max_examples: int, coverage: bool) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": 20260210,
            "generation": {"max-examples": max_examples},
            "phases": {"coverage": {"enabled": coverage}},
            "operations": [
                {
                    "include-path": path,
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "400", "401", "403", "404", "409"]
                        }
                    },
                }
                for path in SCHEMA_CANNOT_SAY
            ],
        }
    )


class _AppUnderTest:
    """The app Schemathesis calls. The schema is loaded when this module is imported; the
    database the app needs exists only once the fixtures have started it."""

    app: FastAPI | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None, "the `served` fixture sets the app"
        await self.app(scope, receive, send)


APP = _AppUnderTest()
# The document does not depend on the database: any URL gives the same.
DOCUMENT: dict[str, Any] = create_app(
    Settings.from_env(), "postgresql://localhost/unused"
).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=config(max_examples=25, coverage=True))
schema.app = APP
# A read key is refused every write (403) and reads like the write key; no key is a 401
# everywhere (test_errors.py pins the order of the checks). A few random cases per
# operation show that those answers are documented too, without repeating the write key's
# boundary cases. (For every operation that answered a 2xx, Schemathesis also tries the
# request again without a key and with a wrong one, and expects a 401.)
other_keys_schema = schemathesis.openapi.from_dict(
    DOCUMENT, config=config(max_examples=8, coverage=False)
)
other_keys_schema.app = APP

# The fixtures are per test on purpose: every example of an operation runs against the
# database they set up. No example database: the runs are deterministic anyway.
SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture
async def keys(engine: AsyncEngine) -> dict[str, str]:
    """The seed's organization and user, and the keys the cases go with."""
    organization = OrganizationIn(name="Acme Corp")
    await transact(engine, put_organization, ADMIN, EXAMPLE_ORGANIZATION_ID, organization)
    user = UserIn(
        organization_id=EXAMPLE_ORGANIZATION_ID, name="John Smith", email="john@example.com"
    )
    await transact(engine, put_user, ADMIN, EXAMPLE_USER_ID, user)
    return {
        "admin-write": await make_key(engine, write=True),
        "admin-read": await make_key(engine),
    }


@pytest.fixture
def served(database_url: str, settings: Settings) -> Iterator[None]:
    # Schemathesis runs the app, its lifespan included, on an event loop of its own, and
    # ends the lifespan when the test ends.
    APP.app = create_app(settings, database_url)
    yield
    APP.app = None


def call_and_validate(case: Case, key: str | None) -> None:
    case.call_and_validate(headers={"X-API-Key": key} if key else None)


# The parametrization names the key in each test's id; it also gives each operation an id
# of its own (`[GET /healthz][admin-write]`), which pytest 9.2 otherwise drops.
@pytest.mark.slow
@schema.parametrize()
@pytest.mark.parametrize("credential", ["admin-write"])
@SETTINGS
def test_the_service_keeps_its_openapi_schema(
    case: Case, credential: str, keys: dict[str, str], served: None
) -> None:
    call_and_validate(case, keys[credential])


@other_keys_schema.parametrize()
@pytest.mark.parametrize("credential", ["admin-read", "none"])
@SETTINGS
def test_the_schema_holds_for_a_read_key_and_without_a_key(
    case: Case, credential: str, keys: dict[str, str], served: None
) -> None:
    call_and_validate(case, keys.get(credential))

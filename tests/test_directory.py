"""The directory: `PUT` upserts of partners, organizations and users, inside a key's scope."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.answers import error
from tests.support.factories import make_key, make_organization, make_partner, make_user


async def put(
    client: httpx.AsyncClient, key: str, path: str, body: Any
) -> tuple[int, dict[str, Any]]:
    response = await client.put(path, json=body, headers={"X-API-Key": key})
    return response.status_code, response.json()


@pytest.fixture
async def admin(engine: AsyncEngine) -> str:
    return await make_key(engine, write=True)


# PUT /v1/partners/{partner_id}


async def test_admin_creates_then_renames_a_partner(client: httpx.AsyncClient, admin: str) -> None:
    assert await put(client, admin, "/v1/partners/p1", {"name": "Agency"}) == (
        201,
        {"success": True, "partner": {"id": "p1", "name": "Agency"}},
    )
    assert await put(client, admin, "/v1/partners/p1", {"name": "Agency Two"}) == (
        200,
        {"success": True, "partner": {"id": "p1", "name": "Agency Two"}},
    )


@pytest.mark.parametrize("scope", ["partner", "organization"])
async def test_only_admin_keys_manage_partners(
    client: httpx.AsyncClient, engine: AsyncEngine, scope: str
) -> None:
    partner_id = await make_partner(engine)
    organization_id = await make_organization(engine, partner_id=partner_id)
    key = await make_key(
        engine,
        scope,  # type: ignore[arg-type]
        partner_id=partner_id if scope == "partner" else None,
        organization_id=organization_id if scope == "organization" else None,
        write=True,
    )
    # Not even its own partner, and before the body is looked at: the rule is the key's.
    for path, body in [(f"/v1/partners/{partner_id}", {"name": "Mine"}), ("/v1/partners/p9", {})]:
        assert await put(client, key, path, body) == (
            403,
            error("API key does not have admin scope"),
        )


# PUT /v1/organizations/{organization_id}


async def test_admin_creates_and_updates_an_organization(
    client: httpx.AsyncClient, engine: AsyncEngine, admin: str
) -> None:
    p1, p2 = await make_partner(engine), await make_partner(engine)
    assert await put(client, admin, "/v1/organizations/o1", {"name": "Acme Corp"}) == (
        201,
        {"success": True, "organization": {"id": "o1", "name": "Acme Corp", "partner_id": None}},
    )
    body = {"name": "Acme Inc", "partner_id": p1}
    assert await put(client, admin, "/v1/organizations/o1", body) == (
        200,
        {"success": True, "organization": {"id": "o1", "name": "Acme Inc", "partner_id": p1}},
    )
    # Without partner_id the partner stays; an admin moves it explicitly.
    assert await put(client, admin, "/v1/organizations/o1", {"name": "Acme"}) == (
        200,
        {"success": True, "organization": {"id": "o1", "name": "Acme", "partner_id": p1}},
    )
    assert await put(client, admin, "/v1/organizations/o1", {"name": "Acme", "partner_id": p2}) == (
        200,
        {"success": True, "organization": {"id": "o1", "name": "Acme", "partner_id": p2}},
    )
    assert await put(
        client, admin, "/v1/organizations/o1", {"name": "Acme", "partner_id": None}
    ) == (
        200,
        {"success": True, "organization": {"id": "o1", "name": "Acme", "partner_id": None}},
    )


async def test_organization_with_unknown_partner_is_404(
    client: httpx.AsyncClient, admin: str
) -> None:
    body = {"name": "Acme", "partner_id": "no-such-partner"}
    assert await put(client, admin, "/v1/organizations/o1", body) == (
        404,
        error("partner not found"),
    )


async def test_partner_key_manages_organizations_of_its_own_partner(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    mine = await make_partner(engine)
    key = await make_key(engine, "partner", partner_id=mine, write=True)
    # Created under its own partner, whether it says so or not.
    for organization_id, body in [
        ("o1", {"name": "One"}),
        ("o2", {"name": "Two", "partner_id": mine}),
    ]:
        assert await put(client, key, f"/v1/organizations/{organization_id}", body) == (
            201,
            {
                "success": True,
                "organization": {"id": organization_id, "name": body["name"], "partner_id": mine},
            },
        )
    assert await put(client, key, "/v1/organizations/o1", {"name": "Uno"}) == (
        200,
        {"success": True, "organization": {"id": "o1", "name": "Uno", "partner_id": mine}},
    )


async def test_partner_key_cannot_use_another_partner(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    mine, theirs = await make_partner(engine), await make_partner(engine)
    key = await make_key(engine, "partner", partner_id=mine, write=True)
    await put(client, key, "/v1/organizations/o1", {"name": "One"})
    # Another partner does not exist for this key, exactly like an unknown one.
    for partner_id in (theirs, "no-such-partner"):
        for path in ("/v1/organizations/o1", "/v1/organizations/o2"):
            body = {"name": "One", "partner_id": partner_id}
            assert await put(client, key, path, body) == (404, error("partner not found"))
    for path in ("/v1/organizations/o1", "/v1/organizations/o2"):
        assert await put(client, key, path, {"name": "One", "partner_id": None}) == (
            403,
            error("only admin keys may change an organization's partner"),
        )


async def test_a_partner_key_learns_nothing_of_organizations_outside_its_scope(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Whatever partner it asks for, an organization of another partner answers exactly
    like an id never seen: the partner is judged before the organization is looked up."""
    mine, theirs = await make_partner(engine), await make_partner(engine)
    key = await make_key(engine, "partner", partner_id=mine, write=True)
    out_of_scope = await make_organization(engine, "Theirs", theirs)
    for partner_id in ("no-such-partner", theirs, None):
        body = {"name": "x", "partner_id": partner_id}
        answers = [
            await client.put(
                f"/v1/organizations/{organization_id}", json=body, headers={"X-API-Key": key}
            )
            for organization_id in (out_of_scope, "never-seen")
        ]
        assert answers[0].status_code == answers[1].status_code in (403, 404), partner_id
        assert answers[0].content == answers[1].content, partner_id


async def test_partner_key_cannot_touch_other_organizations(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    mine, theirs = await make_partner(engine), await make_partner(engine)
    key = await make_key(engine, "partner", partner_id=mine, write=True)
    others = [
        await make_organization(engine, "Theirs", theirs),
        await make_organization(engine, "Nobody's"),
    ]
    for organization_id in others:
        for body in ({"name": "Mine now"}, {"name": "Mine now", "partner_id": mine}):
            assert await put(client, key, f"/v1/organizations/{organization_id}", body) == (
                404,
                error("organization not found"),
            )


async def test_organization_key_renames_only_its_own_organization(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id = await make_partner(engine)
    mine = await make_organization(engine, "Mine", partner_id)
    other = await make_organization(engine, "Other", partner_id)
    key = await make_key(engine, "organization", organization_id=mine, write=True)
    for body in ({"name": "Renamed"}, {"name": "Renamed", "partner_id": partner_id}):
        assert await put(client, key, f"/v1/organizations/{mine}", body) == (
            200,
            {
                "success": True,
                "organization": {"id": mine, "name": "Renamed", "partner_id": partner_id},
            },
        )
    for organization_id in (other, "new-organization"):
        assert await put(client, key, f"/v1/organizations/{organization_id}", {"name": "X"}) == (
            404,
            error("organization not found"),
        )


async def test_organization_key_cannot_change_its_partner(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id, other = await make_partner(engine), await make_partner(engine)
    mine = await make_organization(engine, "Mine", partner_id)
    key = await make_key(engine, "organization", organization_id=mine, write=True)
    path = f"/v1/organizations/{mine}"
    assert await put(client, key, path, {"name": "X", "partner_id": other}) == (
        404,
        error("partner not found"),
    )
    assert await put(client, key, path, {"name": "X", "partner_id": None}) == (
        403,
        error("only admin keys may change an organization's partner"),
    )


async def test_organization_key_of_an_organization_without_partner(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id = await make_partner(engine)
    mine = await make_organization(engine, "Mine")
    key = await make_key(engine, "organization", organization_id=mine, write=True)
    path = f"/v1/organizations/{mine}"
    assert await put(client, key, path, {"name": "X", "partner_id": None}) == (
        200,
        {"success": True, "organization": {"id": mine, "name": "X", "partner_id": None}},
    )
    assert await put(client, key, path, {"name": "X", "partner_id": partner_id}) == (
        404,
        error("partner not found"),
    )


# PUT /v1/users/{user_id}


async def test_user_is_created_then_updated(
    client: httpx.AsyncClient, engine: AsyncEngine, admin: str
) -> None:
    organization_id = await make_organization(engine)
    body = {"organization_id": organization_id, "name": "John Smith", "email": "john@example.com"}
    assert await put(client, admin, "/v1/users/u1", body) == (
        201,
        {"success": True, "user": {"id": "u1", **body}},
    )
    body |= {"name": "John Q. Smith", "email": "jqs@example.com"}
    assert await put(client, admin, "/v1/users/u1", body) == (
        200,
        {"success": True, "user": {"id": "u1", **body}},
    )
    response = await client.get(
        "/v1/analytics/usage", params={"user_id": "u1"}, headers={"X-API-Key": admin}
    )
    usage = response.json()["usage"]
    assert (usage["user_name"], usage["user_email"]) == ("John Q. Smith", "jqs@example.com")


async def test_user_never_moves_to_another_organization(
    client: httpx.AsyncClient, engine: AsyncEngine, admin: str
) -> None:
    first, second = await make_organization(engine), await make_organization(engine)
    user_id = await make_user(engine, first)
    body = {"organization_id": second, "name": "U", "email": "u@example.com"}
    assert await put(client, admin, f"/v1/users/{user_id}", body) == (
        409,
        error("user belongs to another organization"),
    )


async def test_user_in_an_organization_out_of_scope_is_404(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id, other = await make_partner(engine), await make_partner(engine)
    mine = await make_organization(engine, "Mine", partner_id)
    theirs = await make_organization(engine, "Theirs", other)
    key = await make_key(engine, "partner", partner_id=partner_id, write=True)
    for organization_id in (theirs, "no-such-organization"):
        body = {"organization_id": organization_id, "name": "U", "email": "u@example.com"}
        assert await put(client, key, "/v1/users/u1", body) == (
            404,
            error("organization not found"),
        )
    # An id taken by a user the key cannot see: that user does not exist for it.
    user_id = await make_user(engine, theirs)
    body = {"organization_id": mine, "name": "U", "email": "u@example.com"}
    assert await put(client, key, f"/v1/users/{user_id}", body) == (404, error("user not found"))


async def test_organization_key_manages_users_of_its_organization(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    mine, other = await make_organization(engine), await make_organization(engine)
    key = await make_key(engine, "organization", organization_id=mine, write=True)
    body = {"organization_id": mine, "name": "U", "email": "u@example.com"}
    assert (await put(client, key, "/v1/users/u1", body))[0] == 201
    body = {"organization_id": other, "name": "U", "email": "u@example.com"}
    assert await put(client, key, "/v1/users/u2", body) == (404, error("organization not found"))


# Names, emails, ids and bodies


GOOD_NAMES = [
    "J",
    "x" * 255,
    "Zoë Ångström",
    "東京 株式会社",
    "Ünïcödé 😀",
    "👨‍👩‍👧 family",
    "  spaced  ",
]


async def test_names_of_1_to_255_characters_are_kept_as_given(
    client: httpx.AsyncClient, admin: str
) -> None:
    for n, name in enumerate(GOOD_NAMES):
        assert await put(client, admin, f"/v1/partners/p{n}", {"name": name}) == (
            201,
            {"success": True, "partner": {"id": f"p{n}", "name": name}},
        )
        assert await put(client, admin, f"/v1/organizations/o{n}", {"name": name}) == (
            201,
            {"success": True, "organization": {"id": f"o{n}", "name": name, "partner_id": None}},
        )


BAD_NAMES = [
    ("", "invalid name: String should have at least 1 character"),
    ("x" * 256, "invalid name: String should have at most 255 characters"),
    ("é" * 256, "invalid name: String should have at most 255 characters"),
    ("a\nb", "invalid name: must not contain control or format characters"),
    ("a\tb", "invalid name: must not contain control or format characters"),
    ("a\x00b", "invalid name: must not contain control or format characters"),
    ("a\x7fb", "invalid name: must not contain control or format characters"),
    ("a\x85b", "invalid name: must not contain control or format characters"),
    # Format characters: a right-to-left override, zero-width ones, a byte order mark.
    ("evil\u202egnp.exe", "invalid name: must not contain control or format characters"),
    ("a\u200bb", "invalid name: must not contain control or format characters"),
    ("\u200d", "invalid name: must not be blank"),
    ("\ufeffAcme", "invalid name: must not contain control or format characters"),
    ("a\u2028b", "invalid name: must not contain control or format characters"),
    (" ", "invalid name: must not be blank"),
    ("\u3000 \u00a0", "invalid name: must not be blank"),
    (None, "invalid name: Input should be a valid string"),
    (42, "invalid name: Input should be a valid string"),
]


@pytest.mark.parametrize("path", ["/v1/partners/p1", "/v1/organizations/o1", "/v1/users/u1"])
async def test_bad_names_are_400(
    client: httpx.AsyncClient, engine: AsyncEngine, admin: str, path: str
) -> None:
    organization_id = await make_organization(engine)
    answers = {}
    for name, _ in BAD_NAMES:
        body = {"name": name}
        if path.startswith("/v1/users/"):
            body |= {"organization_id": organization_id, "email": "u@example.com"}
        answers[repr(name)] = await put(client, admin, path, body)
    assert answers == {repr(name): (400, error(message)) for name, message in BAD_NAMES}


async def test_lone_surrogate_in_a_name_is_400(client: httpx.AsyncClient, admin: str) -> None:
    response = await client.put(
        "/v1/partners/p1",
        content=b'{"name": "a\\ud800b"}',
        headers={"X-API-Key": admin, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid name: ")


GOOD_EMAILS = [
    "john@example.com",
    "john.smith+usage@mail.example.co.uk",
    "o'brien@example.org",
    "ü@exämple.com",
]
BAD_EMAILS = [
    "",
    "john",
    "john@",
    "@example.com",
    "john@example",
    "john@@example.com",
    "john smith@example.com",
    "john@localhost",
    "John Smith <john@example.com>",
    "x" * 250 + "@example.com",
]


async def test_valid_emails_are_kept_and_invalid_ones_are_400(
    client: httpx.AsyncClient, engine: AsyncEngine, admin: str
) -> None:
    organization_id = await make_organization(engine)
    for n, email in enumerate(GOOD_EMAILS):
        body = {"organization_id": organization_id, "name": "U", "email": email}
        assert await put(client, admin, f"/v1/users/u{n}", body) == (
            201,
            {"success": True, "user": {"id": f"u{n}", **body}},
        )
    for email in BAD_EMAILS:
        body = {"organization_id": organization_id, "name": "U", "email": email}
        status, answer = await put(client, admin, "/v1/users/bad", body)
        assert (status, answer["success"]) == (400, False), email
        assert answer["error"].startswith("invalid email: "), email
    message = "invalid email: must be an email address alone, without a display name"
    body = {"organization_id": organization_id, "name": "U", "email": "J <j@example.com>"}
    assert await put(client, admin, "/v1/users/bad", body) == (400, error(message))


@pytest.mark.parametrize(
    ("kind", "field"),
    [("partners", "partner_id"), ("organizations", "organization_id"), ("users", "user_id")],
)
async def test_malformed_id_in_the_path_is_400(
    client: httpx.AsyncClient, admin: str, kind: str, field: str
) -> None:
    raws = ["%20", "a%20b", "x" * 129, "caf%C3%A9", "a%00b", "a%09b", ""]
    answers = {}
    for raw in raws:
        response = await client.put(
            f"/v1/{kind}/{raw}", json={"name": "X"}, headers={"X-API-Key": admin}
        )
        answers[raw] = (response.status_code, response.json())
    assert answers == {raw: (400, error(f"invalid {field}")) for raw in raws}


async def test_ids_may_hold_any_visible_ascii_character(
    client: httpx.AsyncClient, admin: str
) -> None:
    organization_id = "acme/eu-1:#?%~"
    encoded = "acme%2Feu-1:%23%3F%25~"
    assert await put(client, admin, f"/v1/organizations/{encoded}", {"name": "EU"}) == (
        201,
        {
            "success": True,
            "organization": {"id": organization_id, "name": "EU", "partner_id": None},
        },
    )
    response = await client.get(
        "/v1/analytics/usage",
        params={"organization_id": organization_id},
        headers={"X-API-Key": admin},
    )
    assert response.json()["usage"]["organization_id"] == organization_id


FIELD_ERRORS = [
    (
        "/v1/partners/p1",
        {"name": "P", "nickname": "p"},
        "invalid nickname: Extra inputs are not permitted",
    ),
    (
        "/v1/organizations/o1",
        {"name": "O", "id": "o1"},
        "invalid id: Extra inputs are not permitted",
    ),
    ("/v1/organizations/o1", {"partner_id": None}, "invalid name: Field required"),
    (
        "/v1/organizations/o1",
        {"name": "O", "partner_id": 7},
        "invalid partner_id: Input should be a valid string",
    ),
    (
        "/v1/organizations/o1",
        {"name": "O", "partner_id": "a b"},
        "invalid partner_id: must be 1 to 128 visible ASCII characters",
    ),
    (
        "/v1/users/u1",
        {"name": "U", "email": "u@example.com"},
        "invalid organization_id: Field required",
    ),
    (
        "/v1/users/u1",
        {"organization_id": "o1", "name": "U", "email": "u@example.com", "role": "admin"},
        "invalid role: Extra inputs are not permitted",
    ),
    ("/v1/users/u1", {"organization_id": "o1", "name": "U"}, "invalid email: Field required"),
]


async def test_body_field_errors_are_400(client: httpx.AsyncClient, admin: str) -> None:
    answers = [await put(client, admin, path, body) for path, body, _ in FIELD_ERRORS]
    assert answers == [(400, error(message)) for _, _, message in FIELD_ERRORS]


NOT_AN_OBJECT = [
    (b"", "request body must be valid JSON"),
    (b"name=Acme", "request body must be valid JSON"),
    (b'{"name": "Acme"', "request body must be valid JSON"),
    (b"\xff\xfe", "request body must be valid JSON"),
    (b'["Acme"]', "request body must be a JSON object"),
    (b'"Acme"', "request body must be a JSON object"),
    (b"null", "request body must be a JSON object"),
]


@pytest.mark.parametrize("path", ["/v1/partners/p1", "/v1/organizations/o1", "/v1/users/u1"])
async def test_body_that_is_not_a_json_object_is_400(
    client: httpx.AsyncClient, admin: str, path: str
) -> None:
    answers = {}
    for content, _ in NOT_AN_OBJECT:
        response = await client.put(
            path, content=content, headers={"X-API-Key": admin, "Content-Type": "application/json"}
        )
        answers[content] = (response.status_code, response.json())
    assert answers == {content: (400, error(message)) for content, message in NOT_AN_OBJECT}


async def test_organization_created_concurrently_by_another_tenant_is_not_taken_over(
    engine: AsyncEngine,
) -> None:
    """A partner key's PUT racing another partner's creation of the same id gets a 404."""
    import asyncio

    from sqlalchemy import text

    from usage_api.auth import Principal
    from usage_api.directory import put_organization
    from usage_api.errors import ApiError
    from usage_api.schemas import OrganizationIn

    mine, theirs = await make_partner(engine), await make_partner(engine)
    me = Principal("k", "partner", mine, None, can_write=True)
    async with engine.connect() as other:
        transaction = await other.begin()
        await other.execute(
            text("INSERT INTO organizations (id, name, partner_id) VALUES ('o1', 'Theirs', :p)"),
            {"p": theirs},
        )
        async with engine.begin() as conn:
            # Our look-up does not see their uncommitted row; our insert waits for it.
            attempt = asyncio.create_task(
                put_organization(conn, me, "o1", OrganizationIn(name="Mine"))
            )
            await asyncio.sleep(0.2)
            assert not attempt.done()
            await transaction.commit()
            with pytest.raises(ApiError) as raised:
                await attempt
        assert (raised.value.status, raised.value.message) == (404, "organization not found")
        row = (await other.execute(text("SELECT name, partner_id FROM organizations"))).one()
        assert tuple(row) == ("Theirs", theirs)

"""The dashboard's pages: sign-in and sign-out, the admin's picker, and one view per
partner, organization and user, each with its filters in its URL.

Pages are rendered on the server (Jinja2, autoescaped); the one script only sets the
browser's time zone and runs the opt-in live refresh. The session cookie is read here and
nowhere else: the `/v1` API knows only `X-API-Key`.
"""

from __future__ import annotations

import gzip
from dataclasses import replace
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.responses import RedirectResponse, Response

from usage_api.analytics.totals import sums_json
from usage_api.dashboard import charts, export, figures, sessions, tenants
from usage_api.dashboard.filters import (
    GRANULARITIES,
    METRIC_COLUMNS,
    PAGE_SIZE,
    PERIODS,
    FilterError,
    Filters,
    parse_filters,
)
from usage_api.dashboard.sessions import Session
from usage_api.dates import utc_now
from usage_api.db import PrimaryEngine, run_autocommit, transact
from usage_api.errors import ApiError
from usage_api.http.deps import services
from usage_api.ids import is_valid_id
from usage_api.replicas import Reads

PREFIX = "/dashboard"
_STATIC_TYPES = {
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
_STATIC = {
    name: (resources.files("usage_api.dashboard").joinpath("static", name).read_bytes(), kind)
    for name, kind in _STATIC_TYPES.items()
}
_GZIP_MIN_BYTES = 1024


class _TenantIdConvertor(PathConvertor):
    """A caller's id: anything, for `is_valid_id` to judge (see app.py's `id` convertor)."""

    regex = "(?s:.*)"


register_url_convertor("tenant_id", _TenantIdConvertor())

_templates = Environment(
    loader=PackageLoader("usage_api.dashboard", "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters["n"] = lambda value: f"{value:,}"
_templates.globals.update(
    periods=PERIODS,
    granularities=GRANULARITIES,
    metric_columns=METRIC_COLUMNS,
    bucket_label=charts.bucket_label,
    urlencode=urlencode,
    sort_columns=[("name", "Name"), *((name, heading) for name, heading, _ in METRIC_COLUMNS)],
)
_templates.filters["q"] = lambda value: quote(str(value), safe="")

router = APIRouter(include_in_schema=False)


def _compressed(request: Request, body: bytes, media_type: str, status: int = 200) -> Response:
    headers = {"Vary": "Accept-Encoding"}
    if len(body) >= _GZIP_MIN_BYTES and "gzip" in request.headers.get("accept-encoding", ""):
        body = gzip.compress(body, compresslevel=6)
        headers["Content-Encoding"] = "gzip"
    return Response(body, status_code=status, media_type=media_type, headers=headers)


def _page(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    html = _templates.get_template(template).render(request=request, **context)
    response = _compressed(request, html.encode(), "text/html; charset=utf-8", status)
    # Pages carry tenant data: never kept by a browser or a proxy.
    response.headers["Cache-Control"] = "no-store"
    return response


def _engine(request: Request) -> Reads:
    """Where the pages' reads go: a replica when there is a healthy one."""
    return services(request).databases.read


def _primary(request: Request) -> PrimaryEngine:
    """Sessions are key bookkeeping: always the primary, so a revocation is seen at once."""
    return services(request).databases.primary


async def _session(request: Request) -> Session | None:
    token = request.cookies.get(sessions.COOKIE)
    if not token:
        return None
    session = await run_autocommit(_primary(request), sessions.find_session, token)
    if session is not None:
        request.state.key_id = session.principal.key_id
    return session


def _to_sign_in(request: Request, ended: bool) -> Response:
    """Back to the sign-in page, remembering where the visitor was going."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    query = {"next": target} if target != PREFIX else {}
    if ended:
        query["ended"] = "1"
    response = RedirectResponse(f"{PREFIX}/sign-in?{urlencode(query)}".rstrip("?"), 303)
    if ended:
        sessions.clear_cookie(response, request)
    response.headers["Cache-Control"] = "no-store"
    return response


def _safe_next(value: str | None) -> str:
    """Only a path of the dashboard itself: never an open redirect."""
    if value and value.startswith(PREFIX) and not value.startswith("//"):
        rest = value[len(PREFIX) :]
        if rest == "" or rest[0] in "/?":
            return value
    return PREFIX


def _message(request: Request, status: int, title: str, text: str, **context: Any) -> Response:
    return _page(request, "message.html", status, title=title, text=text, **context)


def _gone(request: Request, kind: str) -> Response:
    """The tenant left the key's scope between finding it and reading its numbers."""
    return _message(request, 404, f"No such {kind}", "Your key may no longer see it.")


def _unavailable(request: Request, exc: ApiError) -> Response:
    if exc.status == 503:
        response = _message(
            request,
            503,
            "Temporarily unavailable",
            "The usage service cannot reach its database just now. Try again in a moment.",
        )
        response.headers["Retry-After"] = (exc.headers or {}).get("Retry-After", "2")
        return response
    raise exc


@router.get(PREFIX)
async def home(request: Request) -> Response:
    """Where a key lands: its own partner or organization, or the admin's picker."""
    try:
        session = await _session(request)
    except ApiError as exc:
        return _unavailable(request, exc)
    if session is None:
        return _to_sign_in(request, ended=sessions.COOKIE in request.cookies)
    principal = session.principal
    tz = request.query_params.get("tz")
    query = f"?{urlencode({'tz': tz})}" if tz else ""
    if principal.scope == "partner":
        own = quote(str(principal.partner_id), safe="")
        return RedirectResponse(f"{PREFIX}/partners/{own}{query}", 303)
    if principal.scope == "organization":
        own = quote(str(principal.organization_id), safe="")
        return RedirectResponse(f"{PREFIX}/organizations/{own}{query}", 303)
    page_text = request.query_params.get("page", "1")
    page = int(page_text) if page_text.isdigit() and 0 < int(page_text) < 1_000_000 else 1
    try:
        partners, organizations, pages = await _engine(request).run(tenants.admin_lists, page)
    except ApiError as exc:
        return _unavailable(request, exc)
    return _page(
        request,
        "picker.html",
        session=session,
        partners=partners,
        organizations=organizations,
        page=page,
        pages=pages,
        tz=tz,
    )


@router.get(f"{PREFIX}/sign-in")
async def sign_in_form(request: Request) -> Response:
    """The sign-in form."""
    params = request.query_params
    notice = None
    if params.get("ended") == "1":
        notice = "Your session has ended: it expired, or its key was revoked. Sign in again."
    elif params.get("signed_out") == "1":
        notice = "You are signed out."
    return _page(
        request, "sign_in.html", notice=notice, next=_safe_next(params.get("next")), error=None
    )


@router.post(f"{PREFIX}/sign-in")
async def sign_in(request: Request) -> Response:
    """Exchange a pasted key for a session cookie."""
    if not sessions.is_same_origin(request):
        return _message(
            request, 403, "Sign-in refused", "Sign in from this site's own sign-in page."
        )
    fields = sessions.form_fields(await request.body())
    key = str(fields.get("key", "")).strip()
    target = _safe_next(fields.get("next"))
    opened = None
    if key:
        try:
            opened = await transact(_primary(request), sessions.open_session, key)
        except ApiError as exc:
            return _unavailable(request, exc)
    if opened is None:
        error = (
            "Paste a key to sign in."
            if not key
            else "That key was not accepted: it is unknown, revoked or expired."
        )
        return _page(request, "sign_in.html", 401, notice=None, next=target, error=error)
    token, lifetime = opened
    tz = str(fields.get("tz", ""))
    if target == PREFIX and tz:
        target = f"{PREFIX}?{urlencode({'tz': tz})}"
    response = RedirectResponse(target, 303)
    sessions.set_cookie(response, request, token, lifetime)
    return response


@router.post(f"{PREFIX}/sign-out")
async def sign_out(request: Request) -> Response:
    """End the session."""
    if not sessions.is_same_origin(request):
        return _message(request, 403, "Sign-out refused", "Sign out from this site's own pages.")
    token = request.cookies.get(sessions.COOKIE)
    if token:
        try:
            await transact(_primary(request), sessions.close_session, token)
        except ApiError as exc:
            return _unavailable(request, exc)
    response = RedirectResponse(f"{PREFIX}/sign-in?signed_out=1", 303)
    sessions.clear_cookie(response, request)
    return response


@router.get(PREFIX + "/static/{name}")
async def static(request: Request, name: str) -> Response:
    """The dashboard's own stylesheet, script and icon."""
    if name not in _STATIC:
        return Response("not found", 404, media_type="text/plain")
    body, media_type = _STATIC[name]
    response = _compressed(request, body, media_type)
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


async def _view(request: Request, kind: str, tenant_id: str) -> Response:
    try:
        session = await _session(request)
        if session is None:
            return _to_sign_in(request, ended=sessions.COOKIE in request.cookies)
        return await _render_view(request, session, kind, tenant_id)
    except figures.KeyGone:
        return _to_sign_in(request, ended=True)
    except ApiError as exc:
        return _unavailable(request, exc)


_FINDERS = {
    "partner": tenants.find_partner,
    "organization": tenants.find_organization,
    "user": tenants.find_user,
}


async def _render_view(request: Request, session: Session, kind: str, tenant_id: str) -> Response:
    engine = _engine(request)
    principal = session.principal
    tenant = None
    if is_valid_id(tenant_id):
        tenant = await engine.run(_FINDERS[kind], principal, tenant_id)
    if tenant is None:
        return _message(
            request,
            404,
            f"No such {kind}",
            f"There is no {kind} with this id that your key may see.",
            session=session,
        )
    params = request.query_params
    tz = params.get("tz")
    # The view's own path, quoted: ids may hold `/`, `?`, `#` or `%`.
    view_path = f"{PREFIX}/{kind}s/{quote(tenant.id, safe='')}"
    base: dict[str, Any] = {"session": session, "tenant": tenant, "view_path": view_path}
    if not tz:
        # The browser's own zone is the default; only the browser knows it.
        utc = f"{view_path}?{urlencode({**params, 'tz': 'UTC'})}"
        return _page(request, "choose_zone.html", **base, utc_url=utc)
    now = utc_now()
    try:
        filters = parse_filters(params, tz, now)
        answer = await figures.series(engine, session.key_hash, tenant, filters)
    except FilterError as exc:
        return _page(
            request, "view.html", 400, **base, filters=None, error=str(exc), raw=dict(params)
        )
    if answer is None:
        return _gone(request, kind)
    total, buckets = answer
    download = params.get("download")
    if download == "series":
        return _csv(request, export.series_csv(buckets), tenant, filters, "series")
    member_kind = "organization" if kind == "partner" else "user"
    if download == "table" and kind != "user":
        rows = await figures.whole_table(engine, session.key_hash, tenant, filters)
        if rows is None:
            return _gone(request, kind)
        return _csv(request, export.table_csv(member_kind, rows), tenant, filters, "table")
    table, notice, member_count = None, None, 0
    if kind != "user":
        try:
            table = await figures.table_page(
                engine, session.key_hash, tenant, filters, PAGE_SIZE, filters.cursor
            )
        except figures.StaleCursor:
            filters = replace(filters, cursor=None, page=1)
            notice = (
                "The table's page link was made for other filters, or for a period that has"
                " moved on since: here is its first page."
            )
            table = await figures.table_page(engine, session.key_hash, tenant, filters, PAGE_SIZE)
        if table is None:
            return _gone(request, kind)
        member_count = await engine.run(tenants.member_count, principal, tenant)
    return _page(
        request,
        "view.html",
        **base,
        filters=filters,
        error=None,
        raw=dict(params),
        total=sums_json(total),
        is_empty=not any(total),
        buckets=buckets,
        bucket_count=len(buckets),
        charts=charts.stacked_charts(buckets, filters.granularity),
        rows=table.rows if table else [],
        next_cursor=table.next_cursor if table else None,
        table_notice=notice,
        member_kind=member_kind,
        member_count=member_count,
        as_of=now.astimezone(filters.zone),
    )


def _csv(
    request: Request, body: str, tenant: tenants.Tenant, filters: Filters, what: str
) -> Response:
    name = f"{tenant.kind}-{what}-{filters.first_day}-{filters.last_day}.csv"
    response = _compressed(request, body.encode(), "text/csv; charset=utf-8")
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get(PREFIX + "/partners/{partner_id:tenant_id}")
async def partner_view(request: Request, partner_id: str) -> Response:
    """A partner's usage and its organizations."""
    return await _view(request, "partner", partner_id)


@router.get(PREFIX + "/organizations/{organization_id:tenant_id}")
async def organization_view(request: Request, organization_id: str) -> Response:
    """An organization's usage and its users."""
    return await _view(request, "organization", organization_id)


@router.get(PREFIX + "/users/{user_id:tenant_id}")
async def user_view(request: Request, user_id: str) -> Response:
    """A user's usage."""
    return await _view(request, "user", user_id)


def as_of_label(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S")


_templates.globals["as_of_label"] = as_of_label

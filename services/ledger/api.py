"""The ledger's read-only HTTP API, for post-hoc analysis while the loop runs.

    GET  /health       {"ok": true, "cursor": <last stream sequence committed>}
    GET  /state        s_t as the proposer sees it (shared.queries.LedgerState)
    GET  /experiments  the latest experiments, newest first (?limit=, at most 1000)
    POST /sql          {"sql": "SELECT ..."} -> {"columns", "rows", "truncated"}; a refused or failing
                       query is a 400 with the reason, a query over the time limit a 408
    GET  /, /live, /runs/<id>, /policy, /api/...   the dashboard (dashboard.py)

With a token (config ledger.http_token, required to bind anything but loopback) every endpoint but /health
answers 401 unless the request carries `Authorization: Bearer <token>`, or the cookie a browser gets by opening
any page once with `?token=<token>`.

The endpoints are plain `def`: FastAPI runs them in its thread pool, so DuckDB never blocks the event
loop, and each call reads through a cursor of its own (store.Ledger), never the appender's connection.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import duckdb
import msgspec
from fastapi import Cookie, Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.requests import Request

from services.ledger import dashboard
from services.ledger.sql import QueryRefused
from services.ledger.store import Ledger
from shared.config import Config

MAX_EXPERIMENTS = 1000


class SqlRequest(BaseModel):
    sql: str
    max_rows: int = 10_000


def _json(value: Any) -> Response:
    """msgspec encodes the Structs directly (and datetimes as RFC 3339)."""
    return Response(msgspec.json.encode(value), media_type="application/json")


COOKIE = "autoresearch_token"


def create_app(ledger: Ledger, config: Config, stop: asyncio.Event) -> FastAPI:
    """The API of `ledger`; `stop` ends the dashboard's live streams, so that the server can stop."""
    token = config.ledger.http_token

    def authorized(authorization: str = Header(""), cookie: str = Cookie("", alias=COOKIE)) -> None:
        if token and not (_same(authorization, f"Bearer {token}") or _same(cookie, token)):
            raise HTTPException(401, "this ledger API requires Authorization: Bearer <ledger.http_token> (a browser: "
                                     "open a page once with ?token=<ledger.http_token>)")

    app = FastAPI(title="AutoResearch-RL ledger", description="Read-only view of the experiment ledger.")

    @app.middleware("http")
    async def token_from_the_address(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """A browser's first visit with ?token=: the right token becomes an HttpOnly cookie, and the address is
        cleaned of it (so it stays out of history and screenshots)."""
        given = request.query_params.get("token")
        if not token or given is None or not _same(given, token):
            return await call_next(request)
        response = RedirectResponse(request.url.remove_query_params("token").path, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/health")  # open, for liveness probes: it tells only how far the ledger has read
    def health() -> Response:
        return _json({"ok": True, "cursor": ledger.cursor})

    guarded = [Depends(authorized)]

    @app.get("/state", dependencies=guarded)
    def state() -> Response:
        return _json(ledger.state())

    @app.get("/experiments", dependencies=guarded)
    def experiments(limit: int = Query(100, ge=1, le=MAX_EXPERIMENTS)) -> Response:
        return _json(ledger.experiments(limit))

    @app.post("/sql", dependencies=guarded)
    def sql(request: SqlRequest) -> Response:
        try:
            return _json(ledger.query(request.sql, max(1, min(request.max_rows, 10_000))))
        except QueryRefused as refusal:
            raise HTTPException(400, f"refused: {refusal}") from None
        except TimeoutError as error:
            raise HTTPException(408, str(error)) from None
        except duckdb.Error as error:
            raise HTTPException(400, f"{type(error).__name__}: {error}") from None

    app.include_router(dashboard.router(ledger, config, stop), dependencies=guarded)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC), name="static")
    return app


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())

"""The worker's HTTP API (Faust's web server), for services that ask rather than listen.

    GET /users/{user_id}/recommendations?k=&category=&exclude_category=&min_price=&max_price=&fallback=trending
                  a user with no events in the window (never seen, or forgotten) is a 404 naming why,
                  or the trending list with fallback=trending
    GET /trending?k=&category=&exclude_category=&min_price=&max_price=   what is popular now (cold start),
                  over every partition: this worker's counts and those the other workers report
    GET /trending/partial?depth=   this worker's own partitions' counts (what the others merge)
    GET /items/{item_id}/together?k=&category=&exclude_category=&min_price=&max_price=   the items people
                  reach right after this one (co-occurrence, as counted from this worker's partitions)
    GET /health   the process is up (liveness)
    GET /ready    partitions assigned and the window table recovered (readiness)
    GET /model    the loaded encoders and the settings that shape a list

A user's window lives on the worker that owns the user's partition: a request that
reaches another worker is forwarded there (Faust's table routing, through each
worker's ``RTREC_HTTP_HOST``). The list is computed from the window as it stands,
exactly as the stream computes it, but with the request's k and filters and
without writing anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any, Protocol, cast

import aiohttp
import faust
from faust.web import Request, Response, View
from multidict import MultiMapping

from streams.cooccurrence import PartitionedCooccurrence
from streams.errors import InvalidRecord
from streams.pipeline import EventBatchProcessor
from streams.ports import ItemFilter
from streams.settings import Settings
from streams.state import UserWindow
from streams.trending import POPULAR_REASON, SHOWN_FIELDS, SNAPSHOT_DEPTH, LogScores, shown_popular
from streams.worker.agents import Agents
from streams.worker.faust_compat import recovered
from streams.worker.tables import TRENDING_TABLE


class BadParameter(ValueError):
    """A query parameter a client got wrong: a 400 naming it."""


def _listed(query: MultiMapping[str], name: str) -> tuple[str, ...]:
    """``?category=a,b`` and ``?category=a&category=b`` alike."""
    values = [v.strip() for raw in query.getall(name, []) for v in raw.split(",")]
    return tuple(v for v in values if v)


def _number(query: MultiMapping[str], name: str) -> float | None:
    if name not in query:
        return None
    try:
        value = float(query[name])
    except ValueError:
        raise BadParameter(f"{name} must be a number, got {query[name]!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BadParameter(f"{name} must be a finite number")
    return value


def parse_request(query: MultiMapping[str], default_k: int, max_k: int) -> tuple[int, ItemFilter | None]:
    """(k, filter) from a request's query string; ``BadParameter`` names what is wrong."""
    known = {"k", "category", "exclude_category", "min_price", "max_price", "fallback"}
    unknown = sorted(set(query.keys()) - known)
    if unknown:
        raise BadParameter(f"unknown parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    k = default_k
    if "k" in query:
        try:
            k = int(query["k"])
        except ValueError:
            raise BadParameter(f"k must be an integer, got {query['k']!r}") from None
        if not 1 <= k <= max_k:
            raise BadParameter(f"k must be between 1 and {max_k}, got {k}")
    rules = ItemFilter(
        categories=_listed(query, "category"),
        exclude_categories=_listed(query, "exclude_category"),
        min_price=_number(query, "min_price"),
        max_price=_number(query, "max_price"),
    )
    if query.get("fallback", "trending") != "trending":
        raise BadParameter(f"fallback must be trending, got {query['fallback']!r}")
    if rules.min_price is not None and rules.max_price is not None and rules.min_price > rules.max_price:
        raise BadParameter(f"min_price {rules.min_price:g} is above max_price {rules.max_price:g}")
    return k, (rules if rules != ItemFilter() else None)


log = logging.getLogger(__name__)

TRENDING_DEPTH = 200  # popular items looked at for one trending list


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: a status and its JSON body."""

    status: int
    body: dict[str, Any]


class WindowReader(Protocol):
    def get(self, key: bytes) -> bytes | None: ...


async def _nowhere(depth: int) -> list[LogScores]:
    return []


class HttpApi:
    """What the API answers, apart from Faust's web server: every state a user's window can be in
    (none, unreadable, emptied by a forget, holding events) gets a 200, 400 or 404 with a JSON body.

    Model and store calls run on the events agent's thread, so they stay ordered with the stream's.
    """

    def __init__(
        self,
        settings: Settings,
        windows: WindowReader,
        state_key: Callable[[str], str],
        worker: Executor,
        events: EventBatchProcessor,
        elsewhere: Callable[[int], Awaitable[list[LogScores]]] = _nowhere,
    ) -> None:
        self.settings = settings
        self.windows = windows
        self.state_key = state_key
        self.worker = worker
        self.events = events
        self.elsewhere = elsewhere  # the trending counts of the partitions other workers own

    async def user_recommendations(self, user_id: str, query: MultiMapping[str]) -> Answer:
        try:
            k, rules = parse_request(query, self.settings.top_k, self.settings.max_http_k)
        except BadParameter as exc:
            return Answer(400, {"error": str(exc)})
        if len(user_id) > self.settings.max_id_chars:
            return Answer(400, {"error": f"user_id longer than {self.settings.max_id_chars} characters"})
        window, missing = self._window(user_id)
        if window is None:
            if "fallback" in query:  # a user with no history (any more): what is popular now
                return Answer(200, await self._trending(k, rules) | {"user_id": user_id})
            return Answer(404, {"error": f"unknown user {user_id!r}: no events in the window{missing}"})
        loop = asyncio.get_running_loop()
        # From the user's variant while an experiment runs, as their lists in the stream are.
        experiment = self.events.experiment
        lists = experiment.current if experiment is not None else self.events.recommender.current
        rec = await loop.run_in_executor(self.worker, lists, user_id, window, k, rules)
        newest = window.entries[-1]
        return Answer(
            200,
            {
                "user_id": user_id,
                "source": "personal",
                "k": k,
                "filter": asdict(rules) if rules else None,
                "model": rec.model if rec else self.events.recommender.encoder.version,
                "experiment": experiment.name if experiment is not None else None,
                "variant": experiment.label(user_id) if experiment is not None else None,
                "window_events": len(window),
                "as_of_event_id": rec.trigger_event_id if rec else newest.event_id,
                "as_of_ts": rec.event_ts if rec else newest.ts,
                "items": [asdict(item) for item in rec.items] if rec else [],
            },
        )

    async def trending(self, query: MultiMapping[str]) -> Answer:
        try:
            k, rules = parse_request(query, self.settings.top_k, self.settings.max_http_k)
        except BadParameter as exc:
            return Answer(400, {"error": str(exc)})
        return Answer(200, await self._trending(k, rules))

    def _window(self, user_id: str) -> tuple[UserWindow | None, str]:
        """The user's window when it holds any event; else None and why (appended to the 404's text)."""
        raw = self.windows.get(self.state_key(user_id).encode("utf-8"))
        if raw is None:
            return None, ""
        try:
            window = self.events.window_limits.load(raw)
        except InvalidRecord as exc:
            # The stream starts such a user afresh at their next event; until then they have no events.
            return None, f" (the stored window is unreadable: {exc.reason})"
        if not window.entries:
            return None, " (the user was forgotten)" if window.forgotten_until else ""
        return window, ""

    async def together(self, item_id: str, query: MultiMapping[str]) -> Answer:
        counted = self.events.cooccurrence
        if counted is None:
            return Answer(
                404,
                {
                    "error": "co-occurrence is not counted here (RTREC_COOCCURRENCE=off, or auto with a "
                    "model that does not fuse it)"
                },
            )
        try:
            k, rules = parse_request(query, self.settings.top_k, self.settings.max_http_k)
        except BadParameter as exc:
            return Answer(400, {"error": str(exc)})
        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(self.worker, self._together_items, counted, item_id, k, rules)
        return Answer(200, {"item_id": item_id, "k": k, "partitions": counted.owned(), "items": items})

    def _together_items(
        self, counted: PartitionedCooccurrence, item_id: str, k: int, request_rules: ItemFilter | None
    ) -> list[dict[str, Any]]:
        # Over-fetched: some may be filtered out, deleted or unavailable.
        ranked = [(i, score) for i, score, _ in counted.scores([item_id], 10 * k, exclude=[item_id])]
        return [{"item_id": i, "score": round(score, 6)} for i, score in self._shown(ranked, request_rules, k)]

    def _shown(
        self, ranked: Sequence[tuple[str, float]], request_rules: ItemFilter | None, k: int
    ) -> list[tuple[str, float]]:
        """The first ``k`` of ``ranked`` that a list may show (``shown_popular``), read from the store."""
        recommender = self.events.recommender
        payloads = recommender.store.fetch_payloads(
            recommender.items_collection, [item_id for item_id, _ in ranked], list(SHOWN_FIELDS)
        )
        return shown_popular(ranked, payloads, recommender.rules_for(request_rules), k)

    def partial_trending(self, query: MultiMapping[str]) -> Answer:
        """This worker's own partitions' counts, for another worker's ``/trending`` to merge."""
        depth = query.get("depth", "")
        if not depth.isdigit() or not 1 <= int(depth) <= SNAPSHOT_DEPTH:
            return Answer(400, {"error": f"depth must be an integer from 1 to {SNAPSHOT_DEPTH}"})
        scores = self.events.trending.log_scores(int(depth))
        return Answer(200, {"partitions": self.events.trending.owned(), "scores": [list(pair) for pair in scores]})

    async def _trending(self, k: int, rules: ItemFilter | None) -> dict[str, Any]:
        # Over-fetched: some of the most popular may be filtered out, deleted or unavailable.
        depth = max(TRENDING_DEPTH, 10 * k)
        elsewhere = await self.elsewhere(depth)
        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(self.worker, self._trending_items, k, rules, depth, elsewhere)
        return {"source": "trending", "k": k, "filter": asdict(rules) if rules else None, "items": items}

    def _trending_items(
        self, k: int, request_rules: ItemFilter | None, depth: int, elsewhere: list[LogScores]
    ) -> list[dict[str, Any]]:
        ranked = self.events.trending.top(depth, elsewhere=elsewhere)
        return [
            {"item_id": item_id, "score": round(score, 6), "reason": POPULAR_REASON}
            for item_id, score in self._shown(ranked, request_rules, k)
        ]


def register_http_api(
    app: faust.App,
    settings: Settings,
    agents: Agents,
    events: EventBatchProcessor,
    model_info: Mapping[str, Any],
) -> None:
    async def elsewhere(depth: int) -> list[LogScores]:
        return await _peers_trending(app, depth)

    api = HttpApi(settings, agents.windows, agents.state_key, agents.event_worker, events, elsewhere)

    @app.page("/users/{user_id}/recommendations")
    @app.table_route(table=agents.windows, match_info="user_id")
    async def user_recommendations(web: View, request: Request, user_id: str) -> Response:
        answer = await api.user_recommendations(user_id, cast(MultiMapping[str], request.query))
        return web.json(answer.body, status=answer.status)

    @app.page("/trending")
    async def trending(web: View, request: Request) -> Response:
        answer = await api.trending(cast(MultiMapping[str], request.query))
        return web.json(answer.body, status=answer.status)

    @app.page("/trending/partial")
    async def partial_trending(web: View, request: Request) -> Response:
        answer = api.partial_trending(cast(MultiMapping[str], request.query))
        return web.json(answer.body, status=answer.status)

    @app.page("/items/{item_id}/together")
    async def together(web: View, request: Request, item_id: str) -> Response:
        answer = await api.together(item_id, cast(MultiMapping[str], request.query))
        return web.json(answer.body, status=answer.status)

    @app.page("/health")
    async def health(web: View, request: Request) -> Response:
        return web.json({"status": "ok"})

    @app.page("/ready")
    async def ready(web: View, request: Request) -> Response:
        is_recovered = recovered(app)
        is_ready = is_recovered and not app.rebalancing
        body = {"ready": is_ready, "rebalancing": app.rebalancing, "recovered": is_recovered}
        return web.json(body, status=200 if is_ready else 503)

    @app.page("/model")
    async def model(web: View, request: Request) -> Response:
        return web.json(dict(model_info))


PEER_TIMEOUT_S = 2.0


async def _peers_trending(app: faust.App, depth: int) -> list[LogScores]:
    """The trending counts of every other worker of the group, asked over HTTP as user requests are
    forwarded; a worker that does not answer in time is left out (and logged)."""
    own = str(app.conf.canonical_url).rstrip("/")
    peers = [url.rstrip("/") for url in app.router.table_metadata(TRENDING_TABLE) if url.rstrip("/") != own]
    if not peers:
        return []
    timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        answers = await asyncio.gather(*(_peer_scores(session, url, depth) for url in peers))
    return [scores for scores in answers if scores is not None]


async def _peer_scores(session: aiohttp.ClientSession, url: str, depth: int) -> LogScores | None:
    try:
        async with session.get(f"{url}/trending/partial", params={"depth": str(depth)}) as answer:
            answer.raise_for_status()
            body = await answer.json()
        return [(str(item_id), float(score)) for item_id, score in body["scores"]]
    except (TimeoutError, aiohttp.ClientError, KeyError, TypeError, ValueError) as exc:
        log.warning("trending: %s did not answer (%r); its partitions are left out of this list", url, exc)
        return None

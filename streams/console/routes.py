"""The console's routes on the worker's web server (``RTREC_CONSOLE=1``, the HTTP API's port).

A user's page is served by the worker that owns the user's partition: a request reaching another
worker is forwarded there, as the API's are. The pipeline and dead-letter pages show the worker
that answers. Model and store calls run on the events agent's thread, in order with the stream's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

import faust
from faust.web import Request, Response, View

from streams.console import pages
from streams.console.explorer import Explorer
from streams.console.feed import PipelineFeed
from streams.pipeline import EventBatchProcessor
from streams.recommend import now_ms
from streams.records import ControlCommand, encode_control
from streams.settings import Settings
from streams.worker.agents import Agents

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 1.0
T = TypeVar("T")


def register_console(
    app: faust.App, settings: Settings, agents: Agents, events: EventBatchProcessor, model_info: Mapping[str, Any]
) -> None:
    feed = PipelineFeed(events.metrics)
    explorer = Explorer(agents.state_key, events, settings.top_k)
    worker_url = str(app.conf.canonical_url)

    def model() -> str:
        return str(events.recommender.encoder.version)

    async def on_worker(call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(agents.event_worker, call, *args)

    def too_long(text: str) -> bool:
        return len(text) > settings.max_id_chars

    @app.timer(SAMPLE_EVERY_S, name="rtrec.console_feed")
    async def sample() -> None:
        feed.sample()

    @app.page("/console")
    async def pipeline(web: View, request: Request) -> Response:
        return web.html(pages.pipeline_page(model(), worker_url))

    @app.page("/console/api/pipeline")
    async def pipeline_feed(web: View, request: Request) -> Response:
        return web.json(feed.snapshot() | {"worker": worker_url, "model": dict(model_info)})

    def looked_up(web: View, request: Request, noun: str, page: Callable[[None, str, str], str]) -> Response:
        """A search form's answer: to the page of the id asked for (a user's is served by their owner)."""
        asked = request.query.get(noun, "").strip()
        if asked and not too_long(asked):
            return web.text("", status=303, headers={"Location": f"/console/{noun}s/{quote(asked, safe='')}"})
        return web.html(page(None, model(), asked))

    @app.page("/console/users")
    async def user_search(web: View, request: Request) -> Response:
        return looked_up(web, request, "user", pages.user_page)

    @app.page("/console/users/{user_id}")
    @app.table_route(table=agents.windows, match_info="user_id")
    async def user(web: View, request: Request, user_id: str) -> Response:
        if too_long(user_id):
            return web.html(pages.user_page(None, model(), ""), status=400)
        stored = agents.windows.get(explorer.window_key(user_id))  # the table is read on the loop, as the stream does
        view = await on_worker(explorer.user, user_id, stored)
        return web.html(pages.user_page(view, model(), user_id))

    @app.page("/console/users/{user_id}/forget")
    class Forget(View):
        async def post(self, request: Request, user_id: str) -> Response:
            if too_long(user_id):
                return self.html(pages.user_page(None, model(), ""), status=400)
            command = ControlCommand("forget_user", user_id, now_ms())
            await agents.output.send(settings.control_topic, user_id.encode("utf-8"), encode_control(command))
            log.info("console: a forget-user command was published")  # the id stays out of the log
            return self.html(pages.forgotten_page(user_id, model()))

    @app.page("/console/items")
    async def item_search(web: View, request: Request) -> Response:
        return looked_up(web, request, "item", pages.item_page)

    @app.page("/console/items/{item_id}")
    async def item(web: View, request: Request, item_id: str) -> Response:
        if too_long(item_id):
            return web.html(pages.item_page(None, model(), ""), status=400)
        view = await on_worker(explorer.item, item_id)
        return web.html(pages.item_page(view, model(), item_id))

    @app.page("/console/dead-letters")
    async def dead_letters(web: View, request: Request) -> Response:
        letters = list(events.metrics.recent_dead_letters)
        return web.html(pages.dead_letters_page(letters, feed.dead_letters_by_reason(), model()))

"""The console's HTML: server-rendered pages, with one small script (``console.js``) for the live charts.

Everything shown is escaped here; nothing is fetched from outside the worker.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import quote

from streams.console.explorer import ItemView, UserView
from streams.recommend import REASON_VERBS
from streams.records import DeadLetter
from streams.state import WindowEntry

_STATIC = resources.files("streams.console")
STYLE = _STATIC.joinpath("console.css").read_text(encoding="utf-8")
SCRIPT = _STATIC.joinpath("console.js").read_text(encoding="utf-8")

PAGES = (
    ("pipeline", "/console", "Pipeline"),
    ("users", "/console/users", "Users"),
    ("items", "/console/items", "Items"),
    ("dead-letters", "/console/dead-letters", "Dead letters"),
)


def when(ms: float) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def layout(page: str, title: str, body: str, model: str) -> str:
    links = " ".join(
        f'<a href="{href}"{" class=here" if name == page else ""}>{label}</a>' for name, href, label in PAGES
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><link rel=icon href='data:,'>"
        f"<title>{escape(title)} · rtrec console</title>"
        f"<style>{STYLE}</style></head><body data-page={page}>"
        f"<header><b>rtrec</b> console <nav>{links}</nav><span class=model>model {escape(model)}</span></header>"
        f"<main>{body}</main><script>{SCRIPT}</script></body></html>"
    )


def pipeline_page(model: str, worker: str) -> str:
    def card(key: str, label: str) -> str:
        return f'<div class=card><div class=value id="{key}">–</div><div class=label>{label}</div></div>'

    def chart(key: str, label: str) -> str:
        return f'<figure><figcaption>{label}</figcaption><svg id="{key}" viewBox="0 0 600 120"></svg></figure>'

    body = (
        f"<h1>Pipeline <small>this worker: {escape(worker)}</small></h1><div class=cards>"
        + card("events-per-s", "events/s")
        + card("lists-per-s", "lists/s")
        + card("dead-letters-per-s", "dead letters/s")
        + card("p50", "event→list p50 (5 min)")
        + card("p99", "event→list p99 (5 min)")
        + card("total-events", "events read")
        + card("total-lists", "lists sent")
        + "</div><div class=charts>"
        + chart("chart-rates", "events/s (blue) and lists/s (green), last 5 minutes")
        + chart("chart-latency", "event→list latency, ms: p50 (blue) and p99 (red) over 10 s")
        + chart("chart-batch", "events per micro-batch")
        + chart("chart-dead", "dead letters/s")
        + "</div><div class=tables><section><h2>Consumer lag</h2><table id=lag><tr><td>–</td></tr></table></section>"
        + "<section><h2>Dead letters by reason</h2><table id=reasons><tr><td>none</td></tr></table></section></div>"
    )
    return layout("pipeline", "Pipeline", body, model)


def search_form(action: str, name: str, value: str, label: str) -> str:
    return (
        f'<form class=search action="{action}" method=get><label>{label} '
        f'<input name="{name}" value="{escape(value)}" autofocus></label> <button>Show</button></form>'
    )


def _item_link(item_id: str, catalog: Mapping[str, Mapping[str, Any]]) -> str:
    title = (catalog.get(item_id) or {}).get("title")
    shown = f"{escape(str(title))} <small>{escape(item_id)}</small>" if title else escape(item_id)
    return f'<a href="/console/items/{quote(item_id, safe="")}">{shown}</a>'


def _category(item_id: str, catalog: Mapping[str, Mapping[str, Any]]) -> str:
    return escape(str((catalog.get(item_id) or {}).get("category") or ""))


def _event_rows(entries: Iterable[WindowEntry], catalog: Mapping[str, Mapping[str, Any]], css: str) -> str:
    rows = []
    for e in entries:
        value = "" if e.value is None else f"{e.value:g}"
        did = escape(REASON_VERBS.get(e.type, e.type))
        rows.append(
            f"<tr class={css}><td>{when(e.ts)}</td><td class=type-{escape(e.type)}>{did}</td>"
            f"<td>{_item_link(e.item_id, catalog)}</td><td>{_category(e.item_id, catalog)}</td><td>{value}</td></tr>"
        )
    return "".join(rows)


def _lookup_page(page: str, noun: str, looked_up: str, found: str, model: str) -> str:
    """A page with a search form for one ``noun`` id, and what was found for ``looked_up``."""
    heading = f"{noun.capitalize()}s"
    body = f"<h1>{heading}</h1>" + search_form(f"/console/{page}", noun, looked_up, f"{noun} id") + found
    return layout(page, f"{noun.capitalize()} {looked_up}" if looked_up else heading, body, model)


def user_page(view: UserView | None, model: str, user_id: str) -> str:
    return _lookup_page("users", "user", user_id, _user_body(view) if view else "", model)


def _user_body(view: UserView) -> str:
    catalog = view.catalog
    head = f"<h2 id=user>{escape(view.user_id)}</h2>"
    if view.state_key:
        key = escape(view.state_key)
        head += f"<p class=note>ids are pseudonymised: this user's state is kept under <code>{key}</code></p>"
    if view.experiment:
        head += _experiment_line(view)
    if view.problem:
        return head + f"<p class=problem id=problem>{escape(view.problem)}</p>"
    interests = f", {view.interests} interests" if view.interests > 1 else ""
    teams = any(i.team for i in view.items)
    rows = "".join(
        f"<tr><td>{n}</td><td>{_item_link(i.item_id, catalog)}</td>"
        f"<td>{escape(str((catalog.get(i.item_id) or {}).get('category') or ''))}</td><td>{i.score:.4f}</td>"
        f"<td class=reason>{escape(i.reason)}</td>"
        + (f"<td>{'' if i.interest is None else i.interest + 1}</td>" if view.interests > 1 else "")
        + (f"<td>{escape(i.team or '')}</td>" if teams else "")
        + "</tr>"
        for n, i in enumerate(view.items, 1)
    )
    interest_head = ("<th>interest</th>" if view.interests > 1 else "") + ("<th>team</th>" if teams else "")
    current = (
        f"<section><h3>Their list now <small>(k={len(view.items)}{interests})</small></h3><table id=list>"
        f"<tr><th>#</th><th>item</th><th>category</th><th>score</th><th>why</th>{interest_head}</tr>{rows}</table></section>"
    )
    window = (
        f"<section><h3>Their window <small>({len(view.entries)} events, newest first)</small></h3><table id=window>"
        "<tr><th>event time</th><th>did</th><th>item</th><th>category</th><th>value</th></tr>"
        + _event_rows(view.entries, catalog, "held")
        + _event_rows(view.evicted, catalog, "evicted")
        + "</table>"
        + (
            "<p class=note>greyed: evicted from the window (kept to replay earlier lists exactly)</p>"
            if view.evicted
            else ""
        )
        + "</section>"
    )
    return head + current + _changes(view) + window + _forget_form(view.user_id)


def _experiment_line(view: UserView) -> str:
    totals = view.experiment_totals
    counted = (
        f": {totals['lists']:.0f} lists received, {totals['engagements']:.0f} engagements, "
        f"{totals['hits']:.0f} credited to their lists"
        if totals
        else " (no list received in it yet)"
    )
    return (
        f"<p id=experiment>in experiment <b>{escape(view.experiment)}</b>{counted}; the list below is their "
        "variant's</p>"
    )


def _changes(view: UserView) -> str:
    if not view.changes:
        return ""
    rows = "".join(
        f"<tr><td>{when(c.event.ts)}</td><td>{escape(REASON_VERBS.get(c.event.type, c.event.type))} "
        f"{_item_link(c.event.item_id, view.catalog)}</td>"
        f"<td class=entered>{_names(c.entered, view.catalog)}</td>"
        f"<td class=left>{_names(c.left, view.catalog)}</td></tr>"
        for c in view.changes
    )
    return (
        "<section><h3>How their list changed <small>(recomputed from the window as each event left it, "
        f"with the model serving now)</small></h3><table id=changes><tr><th>event time</th><th>event</th>"
        f"<th>entered</th><th>left</th></tr>{rows}</table></section>"
    )


def _names(item_ids: Sequence[str], catalog: Mapping[str, Mapping[str, Any]]) -> str:
    return ", ".join(_item_link(i, catalog) for i in item_ids) or "–"


def _forget_form(user_id: str) -> str:
    target = f"/console/users/{quote(user_id, safe='')}/forget"
    return (
        "<section><details id=forget><summary>Forget this user…</summary>"
        "<p>Publishes a forget-user command (as <code>rtrec forget</code> does): their window, vector and cached "
        "state are erased by the worker that owns them, and the events they sent so far never come back.</p>"
        f'<form method=post action="{target}"><button class=danger id=confirm-forget>Yes, forget '
        f"{escape(user_id)}</button></form></details></section>"
    )


def forgotten_page(user_id: str, model: str) -> str:
    back = f"/console/users?user={quote(user_id, safe='')}"
    body = (
        f"<h1>Users</h1><p id=forgotten>A forget-user command for <b>{escape(user_id)}</b> was published. "
        f'The worker that owns the user applies it within moments: <a href="{back}">look again</a>.</p>'
    )
    return layout("users", f"Forgot {user_id}", body, model)


def item_page(view: ItemView | None, model: str, item_id: str) -> str:
    return _lookup_page("items", "item", item_id, _item_body(view) if view else "", model)


def _item_body(view: ItemView) -> str:
    if view.payload is None:
        return f"<p class=problem>{escape(view.item_id)} is not in the catalogue (never published, or deleted)</p>"
    p = view.payload
    available = "available" if p.get("available", True) else "not available (never recommended)"
    facts = [
        ("id", escape(view.item_id)),
        ("category", escape(str(p.get("category") or "–"))),
        ("tags", escape(", ".join(map(str, p.get("tags") or [])) or "–")),
        ("price", "–" if p.get("price") is None else escape(f"{p['price']:g}")),
        ("published", when(p["ts"]) if isinstance(p.get("ts"), int) else "–"),
        ("availability", available),
    ]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    catalog = {item_id: payload for item_id, _, payload in view.neighbours}
    near = "".join(
        f"<tr><td>{_item_link(i, catalog)}</td><td>{escape(str(pl.get('category') or ''))}</td><td>{score:.4f}</td>"
        f"<td>{'yes' if pl.get('available', True) else 'no'}</td></tr>"
        for i, score, pl in view.neighbours
    )
    return (
        f"<h2 id=item>{escape(str(p.get('title') or view.item_id))}</h2><table class=facts>{rows}</table>"
        "<section><h3>Nearest items in the model's space</h3><table id=neighbours>"
        f"<tr><th>item</th><th>category</th><th>similarity</th><th>available</th></tr>{near}</table></section>"
    )


def dead_letters_page(letters: Sequence[DeadLetter], by_reason: Mapping[str, float], model: str) -> str:
    reasons = "".join(f"<tr><td>{escape(r)}</td><td>{n:g}</td></tr>" for r, n in by_reason.items())
    rows = "".join(
        f"<tr><td>{when(d.ts)}</td><td>{escape(d.topic)}</td><td>{d.partition}</td><td>{d.offset}</td>"
        f"<td>{escape(d.error)}</td></tr>"
        for d in reversed(letters)
    )
    body = (
        "<h1>Dead letters <small>this worker's, newest first</small></h1>"
        "<section><h2>By reason</h2><table id=reasons>"
        f"{reasons or '<tr><td>none so far</td></tr>'}</table></section><section><h2>Latest</h2>"
        "<table id=letters><tr><th>dead-lettered</th><th>topic</th><th>partition</th><th>offset</th>"
        "<th>reason</th></tr>"
        f"{rows}</table><p class=note>The original message stays readable at its topic, partition and offset "
        "(and in the dead-letter topic); the console does not show its contents.</p></section>"
    )
    return layout("dead-letters", "Dead letters", body, model)

"""Optional pseudonymisation of user ids before they reach state and the vector store.

With a key (``RTREC_PSEUDONYMIZE_KEY``), the window table's keys and the users
collection's ids and payloads hold a keyed hash (HMAC-SHA-256) of the user id,
never the id itself: whoever reads the changelog or the vector store without the key
cannot tell whose state it is, and a forgotten user leaves nothing linkable. The
input and output topics keep real ids (producers and consumers need them), and so
does the worker's memory while it processes a batch. Without a key, state is keyed
by the user id as given.

Changing the key orphans existing state (every user starts afresh): rotate it only
together with a reset of the app id or the topics.
"""

from __future__ import annotations

import hashlib
import hmac

from streams.settings import Secret


class Pseudonyms:
    def __init__(self, key: Secret | None) -> None:
        self._key = key.reveal().encode("utf-8") if key is not None else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def of(self, user_id: str) -> str:
        """The id state is kept under: a keyed hash of ``user_id``, or ``user_id`` itself without a key."""
        if self._key is None:
            return user_id
        return "p-" + hmac.new(self._key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

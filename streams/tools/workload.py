"""A synthetic workload with ground truth: a readable catalogue and drifting users.

Items belong to categories and carry text a shopper would read, so the text
encoder places them meaningfully. Each user follows one interest (a category)
at a time and switches with a known probability per event; the generator
records the interest behind every event, which is the ground truth the tests
and the demo check recommendations against. Everything is seeded.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from streams.records import Event, Item

CATEGORIES: dict[str, dict[str, list[str]]] = {
    "running": {
        "nouns": [
            "trail running shoes",
            "road running shoes",
            "running socks",
            "hydration vest",
            "GPS running watch",
            "running shorts",
            "reflective running jacket",
            "compression tights",
            "energy gels",
            "running cap",
        ],
        "features": [
            "built for marathon training",
            "breathable mesh for long runs",
            "light enough for race day",
            "grippy outsole for wet trails",
            "keeps you cool on summer runs",
        ],
    },
    "kitchen": {
        "nouns": [
            "cast-iron skillet",
            "chef's knife",
            "bamboo cutting board",
            "stand mixer",
            "espresso machine",
            "nonstick frying pan",
            "enameled dutch oven",
            "spice grinder",
            "measuring cups",
            "pressure cooker",
        ],
        "features": [
            "for everyday home cooking",
            "dishwasher safe",
            "heats evenly on gas and induction",
            "makes weeknight dinners easy",
            "a favourite of professional chefs",
        ],
    },
    "gardening": {
        "nouns": [
            "pruning shears",
            "expandable garden hose",
            "raised bed kit",
            "heirloom tomato seeds",
            "compost bin",
            "watering can",
            "leaf rake",
            "organic potting soil",
            "cedar trellis",
            "garden gloves",
        ],
        "features": [
            "for vegetable gardens and flower beds",
            "helps plants thrive",
            "weatherproof for outdoor use",
            "makes backyard gardening simple",
            "for healthy soil and strong roots",
        ],
    },
    "gaming": {
        "nouns": [
            "mechanical gaming keyboard",
            "wireless gaming mouse",
            "surround sound gaming headset",
            "game controller",
            "144Hz curved gaming monitor",
            "ergonomic gaming chair",
            "RGB mouse pad",
            "4K capture card",
            "streaming microphone",
            "console cooling stand",
        ],
        "features": [
            "low latency for competitive play",
            "RGB lighting",
            "for PC and console gamers",
            "built for long gaming sessions",
            "tournament-grade precision",
        ],
    },
    "baby": {
        "nouns": [
            "baby stroller",
            "infant car seat",
            "diaper bag",
            "video baby monitor",
            "crib mattress",
            "silicone teething toy",
            "convertible high chair",
            "muslin swaddle blanket",
            "bottle warmer",
            "ergonomic baby carrier",
        ],
        "features": [
            "safe for newborns",
            "soft and gentle on baby's skin",
            "designed for new parents",
            "easy to clean after feeding",
            "grows with your toddler",
        ],
    },
    "camping": {
        "nouns": [
            "two-person backpacking tent",
            "down sleeping bag",
            "portable camping stove",
            "trekking poles",
            "backcountry water filter",
            "folding camp chair",
            "hard-sided cooler",
            "rechargeable lantern",
            "60L hiking backpack",
            "inflatable sleeping pad",
        ],
        "features": [
            "for weekend camping trips",
            "packs small for backpacking",
            "withstands wind and rain",
            "made for the backcountry",
            "sets up at the campsite in minutes",
        ],
    },
    "skincare": {
        "nouns": [
            "vitamin C serum",
            "moisturizing face cream",
            "mineral sunscreen SPF 50",
            "gentle foaming cleanser",
            "retinol night cream",
            "hydrating lip balm",
            "purifying clay mask",
            "under-eye cream",
            "exfoliating toner",
            "hyaluronic acid serum",
        ],
        "features": [
            "for sensitive skin",
            "fragrance free and dermatologist tested",
            "brightens dull skin",
            "hydrates all day",
            "part of a simple skincare routine",
        ],
    },
    "music": {
        "nouns": [
            "acoustic guitar",
            "phosphor bronze guitar strings",
            "88-key digital piano",
            "hickory drum sticks",
            "concert ukulele",
            "clip-on guitar tuner",
            "closed-back studio headphones",
            "microphone stand",
            "student violin",
            "digital metronome",
        ],
        "features": [
            "for beginners and touring musicians",
            "rich warm tone",
            "for home studio recording",
            "stays in tune on stage",
            "for practice and performance",
        ],
    },
}
ADJECTIVES = ["classic", "premium", "compact", "lightweight", "durable", "pro", "everyday", "deluxe"]
BRANDS = ["Northwind", "Acme", "Bluebird", "Summit", "Orchid", "Ironwood"]
EVENT_TYPE_WEIGHTS = {"view": 0.6, "click": 0.25, "add_to_cart": 0.1, "purchase": 0.05}


@dataclass(frozen=True)
class WorkloadConfig:
    n_items: int = 800
    n_users: int = 200
    n_categories: int = len(CATEGORIES)
    drift_prob: float = 0.05  # chance per event that a user's interest switches category
    # Chance per event that it comes from the user's second, standing interest instead (0: users of one interest).
    second_interest_prob: float = 0.0
    popularity_skew: float = 1.1  # Zipf exponent of item popularity within a category
    mean_gap_s: float = 60.0  # mean time between one user's events in generated histories
    start_ms: int = 1_700_000_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n_categories <= len(CATEGORIES):
            raise ValueError(f"n_categories must be in 1..{len(CATEGORIES)}")
        if self.n_items < self.n_categories:
            raise ValueError("need at least one item per category")
        for name in ("drift_prob", "second_interest_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability")


@dataclass
class GeneratedEvent:
    event: Event
    interest: str  # the category the user was interested in when this event happened


@dataclass
class _UserState:
    user_id: str
    interest: str
    ts_ms: int
    rng: random.Random = field(repr=False)
    second: str | None = None  # a standing interest some of the user's events come from


class Workload:
    def __init__(self, config: WorkloadConfig) -> None:
        self.config = config
        self.categories = list(CATEGORIES)[: config.n_categories]
        self.catalog = self._build_catalog()
        self.category_of = {item.item_id: item.category for item in self.catalog}
        self._by_category: dict[str, list[str]] = {c: [] for c in self.categories}
        for item in self.catalog:
            self._by_category[item.category].append(item.item_id)
        # Popularity rank is independent of catalogue order (so not all hits share one brand).
        shuffler = random.Random(f"popularity:{config.seed}")
        for ids in self._by_category.values():
            shuffler.shuffle(ids)
        self._weights = {
            c: [1.0 / (rank + 1) ** config.popularity_skew for rank in range(len(ids))]
            for c, ids in self._by_category.items()
        }

    def _build_catalog(self) -> list[Item]:
        rng = random.Random(self.config.seed)
        items = []
        titles: set[str] = set()
        for index in range(self.config.n_items):
            category = self.categories[index % len(self.categories)]
            spec = CATEGORIES[category]
            noun = spec["nouns"][(index // len(self.categories)) % len(spec["nouns"])]
            adjective, brand = rng.choice(ADJECTIVES), rng.choice(BRANDS)
            title = f"{brand} {adjective} {noun}"
            edition = 1
            while title in titles:  # large catalogues: later editions of the same product
                edition += 1
                title = f"{brand} {adjective} {noun} mk {edition}"
            titles.add(title)
            items.append(
                Item(
                    item_id=f"item-{index:06d}",
                    title=title,
                    ts=self.config.start_ms,
                    description=f"A {adjective} {noun} from {brand}, {rng.choice(spec['features'])}.",
                    category=category,
                    tags=(category, noun.split()[-1]),
                    price=round(rng.uniform(5, 300), 2),
                )
            )
        return items

    def user_id(self, index: int) -> str:
        return f"user-{self.config.seed}-{index:06d}"

    def _new_user(self, index: int) -> _UserState:
        rng = random.Random(f"{self.config.seed}:{index}")
        user = _UserState(self.user_id(index), rng.choice(self.categories), self.config.start_ms, rng)
        if self.config.second_interest_prob > 0 and len(self.categories) > 1:  # no draw otherwise: same users as before
            user.second = rng.choice([c for c in self.categories if c != user.interest])
        return user

    def _next_event(self, user: _UserState, ts_ms: int, interest: str | None = None) -> GeneratedEvent:
        rng = user.rng
        if interest is not None:
            user.interest = interest
        elif rng.random() < self.config.drift_prob and len(self.categories) > 1:
            user.interest = rng.choice([c for c in self.categories if c != user.interest])
        category = user.interest
        if user.second is not None and interest is None and rng.random() < self.config.second_interest_prob:
            category = user.second
        item_id = rng.choices(self._by_category[category], weights=self._weights[category])[0]
        event_type = rng.choices(list(EVENT_TYPE_WEIGHTS), weights=list(EVENT_TYPE_WEIGHTS.values()))[0]
        event = Event(
            event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            user_id=user.user_id,
            item_id=item_id,
            type=event_type,
            ts=ts_ms,
        )
        return GeneratedEvent(event, category)

    def histories(self, n_users: int, events_per_user: int, first_user: int = 0) -> list[list[GeneratedEvent]]:
        """Whole per-user histories in event time (training data): gaps are exponential."""
        histories = []
        for index in range(first_user, first_user + n_users):
            user = self._new_user(index)
            history = []
            for _ in range(events_per_user):
                user.ts_ms += max(1, int(user.rng.expovariate(1.0 / self.config.mean_gap_s) * 1000))
                history.append(self._next_event(user, user.ts_ms))
            histories.append(history)
        return histories

    def stream(self, n_events: int, clock: Callable[[], int], first_user: int = 0) -> Iterator[GeneratedEvent]:
        """Interleaved live events of ``config.n_users`` users, stamped by ``clock`` (epoch ms)."""
        rng = random.Random(f"stream:{self.config.seed}:{first_user}")
        users: dict[int, _UserState] = {}
        for _ in range(n_events):
            index = first_user + rng.randrange(self.config.n_users)
            user = users.setdefault(index, self._new_user(index))
            yield self._next_event(user, clock())

    def scripted_user(
        self, index: int, segments: list[tuple[str, int]], clock: Callable[[], int]
    ) -> list[GeneratedEvent]:
        """One user who follows the given (category, n_events) segments: a known interest switch."""
        user = self._new_user(index)
        return [self._next_event(user, clock(), interest=category) for category, n in segments for _ in range(n)]

"""`rtrec`: one command with subcommands.

Every setting can be given as an environment variable (RTREC_<NAME>) or as a
flag (--<name>) before the subcommand; flags win. Errors print one line
(`--traceback` shows the stack).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

from infra.kafka_local import LocalKafka, LocalKafkaConfig
from streams.errors import ConfigError, RtrecError
from streams.settings import ENV_PREFIX, Settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also RTREC_<NAME>; see `rtrec config`)")
    for f in dataclasses.fields(Settings):
        group.add_argument(
            _flag(f.name),
            dest=f"setting_{f.name}",
            default=None,
            metavar="VALUE",
            help=f"{ENV_PREFIX}{f.name.upper()} (default: {f.default!s})",
        )


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k[len("setting_") :]: v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
    return Settings.from_env().with_overrides(**overrides)


def _say(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------ commands


def cmd_config(settings: Settings, _args: argparse.Namespace) -> int:
    values = settings.describe()
    width = max(len(k) for k in values)
    for name, value in values.items():
        print(f"{name:<{width}}  {value}")
    return 0


def _local_broker(settings: Settings) -> LocalKafka:
    return LocalKafka(LocalKafkaConfig(data_dir=settings.kafka_data_path, port=settings.local_kafka_port), _say)


def cmd_broker(settings: Settings, args: argparse.Namespace) -> int:
    broker = _local_broker(settings)
    if args.action == "start":
        print(f"Kafka is up at {broker.start()} (data: {settings.kafka_data_path})")
    elif args.action == "stop":
        print("stopped" if broker.stop() else "no local broker was running")
    else:
        pid = broker.running_pid()
        print(f"running (pid {pid}) at {settings.bootstrap_servers}" if pid else "not running")
        return 0 if pid else 1
    return 0


def cmd_topics(settings: Settings, _args: argparse.Namespace) -> int:
    from infra.topics import ensure_pipeline_topics

    for topic, what in ensure_pipeline_topics(settings).items():
        print(f"{topic}: {what}")
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from encoder.build import ensure_interest_encoder
    from encoder.config import InterestEncoderConfig
    from streams.records import EVENT_TYPES
    from streams.workload import WorkloadConfig

    try:
        cfg = InterestEncoderConfig(event_types=EVENT_TYPES, epochs=args.epochs, window=args.window)
    except ValueError as exc:
        raise ConfigError(f"train: {exc}") from None
    bundle = ensure_interest_encoder(
        settings.models_path,
        WorkloadConfig(n_items=args.items, n_users=args.users),
        cfg,
        n_users=args.train_users,
        events_per_user=args.events_per_user,
        force=args.force,
        progress=_say,
    )
    print(f"interest encoder bundle: {bundle}")
    return 0


def cmd_worker(settings: Settings, _args: argparse.Namespace) -> int:
    import faust

    from streams.app import build_app, load_components

    logging.basicConfig(level=settings.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    components = load_components(settings)
    logging.getLogger("rtrec").info(
        "interest encoder %s on %s; text encoder on %s",
        components.interest_encoder.version,
        components.interest_encoder.provider,
        components.text_embedder.provider,
    )
    app = build_app(settings, components)
    faust.Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from streams.demo import DemoOptions, run_demo

    options = DemoOptions(
        events=args.events, rate=args.rate, users=args.users, items=args.items, keep_broker=args.keep_broker
    )
    tally = run_demo(settings, options, _say)
    return 0 if len(tally.covered) >= tally.sent - tally.bad_sent else 1


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtrec", description="Event-streaming real-time recommender.", allow_abbrev=False
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    _add_settings_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("config", help="print the effective configuration (secrets masked)").set_defaults(run=cmd_config)

    broker = sub.add_parser("broker", help="the local single-node Kafka (KRaft) assembled from Maven Central")
    broker.add_argument("action", choices=["start", "stop", "status"])
    broker.set_defaults(run=cmd_broker)

    sub.add_parser("topics", help="create or update the pipeline's topics (idempotent)").set_defaults(run=cmd_topics)

    train = sub.add_parser("train", help="export the text encoder and train + export the interest encoder")
    train.add_argument("--items", type=int, default=800, help="catalogue size of the generated workload")
    train.add_argument("--users", type=int, default=200, help="live users of the generated workload")
    train.add_argument("--train-users", type=int, default=300, help="generated users to train on")
    train.add_argument("--events-per-user", type=int, default=40, help="history length of each training user")
    train.add_argument("--epochs", type=int, default=8, help="maximum epochs (early stopping may end sooner)")
    train.add_argument("--window", type=int, default=50, help="window length the encoder is trained on")
    train.add_argument("--force", action="store_true", help="retrain even if an identical bundle exists")
    train.set_defaults(run=cmd_train)

    sub.add_parser("worker", help="run a stream worker (scale out: one per core, same app id)").set_defaults(
        run=cmd_worker
    )

    demo = sub.add_parser("demo", help="broker + topics + models + worker + live stream, with a summary")
    demo.add_argument("--events", type=int, default=3000, help="events to stream")
    demo.add_argument("--rate", type=float, default=200.0, help="events per second")
    demo.add_argument("--users", type=int, default=200, help="distinct users")
    demo.add_argument("--items", type=int, default=800, help="catalogue size")
    demo.add_argument("--keep-broker", action="store_true", help="leave the local broker running afterwards")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[Settings, argparse.Namespace], int] = args.run
    try:
        return run(_settings(args), args)
    except RtrecError as exc:
        if args.traceback:
            raise
        print(f"rtrec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

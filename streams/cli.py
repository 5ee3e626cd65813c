"""`rtrec`: one command with subcommands.

Every setting can be given as an environment variable (RTREC_<NAME>) or as a
flag (--<name>) before the subcommand; flags win. Errors print one line
(`--traceback` shows the stack).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encoder.config import PRECISIONS, InterestEncoderConfig
from infra.kafka_local import LocalKafka, LocalKafkaConfig
from infra.processes import LocalServer
from streams.errors import ConfigError, RtrecError
from streams.settings import ENV_PREFIX, Settings, reference_table, spec_of

if TYPE_CHECKING:
    from encoder.data import Dataset
    from streams.records import Recommendation


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
            help=f"{ENV_PREFIX}{f.name.upper()}: {spec_of(f).help} (default: {spec_of(f).shown or f.default!s})",
        )


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k[len("setting_") :]: v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
    return Settings.from_env().with_overrides(**overrides)


def _say(message: str) -> None:
    print(message, flush=True)


def _note(message: str) -> None:
    """Said beside a command's output (on stderr), so that what it prints stays machine-readable."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ commands


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    if args.markdown:
        print(reference_table(), end="")
        return 0
    values = settings.describe()
    width = max(len(k) for k in values)
    for name, value in values.items():
        print(f"{name:<{width}}  {value}")
    return 0


def _local_broker(settings: Settings) -> LocalKafka:
    return LocalKafka(LocalKafkaConfig(data_dir=settings.kafka_data_path, port=settings.local_kafka_port), _say)


def _local_server(action: str, server: LocalServer, start: Callable[[], str], address: str, what: str) -> int:
    """start, stop or status of a local server; status answers 1 when none runs."""
    if action == "start":
        print(start())
    elif action == "stop":
        print("stopped" if server.stop() else f"no local {what} was running")
    else:
        pid = server.running_pid()
        print(f"running (pid {pid}) at {address}" if pid else "not running")
        return 0 if pid else 1
    return 0


def cmd_broker(settings: Settings, args: argparse.Namespace) -> int:
    broker = _local_broker(settings)

    def start() -> str:
        return f"Kafka is up at {broker.start()} (data: {settings.kafka_data_path})"

    return _local_server(args.action, broker, start, settings.bootstrap_servers, "broker")


def cmd_qdrant(settings: Settings, args: argparse.Namespace) -> int:
    from infra.qdrant_local import HOW_TO_GET_ONE, LocalQdrant, LocalQdrantConfig, find_binary

    binary = find_binary(settings.qdrant_binary)
    if binary is None:
        raise ConfigError(HOW_TO_GET_ONE)
    server = LocalQdrant(LocalQdrantConfig(settings.qdrant_server_path, binary, settings.local_qdrant_port), _say)

    def start() -> str:
        url = server.start()
        return f"Qdrant is up at {url} (storage: {server.storage}); workers use it with RTREC_QDRANT_URL={url}"

    return _local_server(args.action, server, start, server.config.url, "Qdrant server")


def cmd_topics(settings: Settings, _args: argparse.Namespace) -> int:
    from infra.topics import ensure_pipeline_topics

    for topic, what in ensure_pipeline_topics(settings).items():
        print(f"{topic}: {what}")
    return 0


def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    import time

    from streams.clients.kafka_io import forget_user_records, make_producer

    # Checked before anything is sent: none is sent unless the worker would apply all.
    records = forget_user_records(args.user_ids, int(time.time() * 1000), settings.limits())
    producer = make_producer(settings)
    try:
        for key, value in records:
            producer.send(settings.control_topic, key=key, value=value)
        producer.flush()
    finally:
        producer.close()
    print(f"forget-user sent to {settings.control_topic} for {len(args.user_ids)} user(s)")
    return 0


def cmd_load_items(settings: Settings, args: argparse.Namespace) -> int:
    from streams.clients.catalog_load import publish_catalog, read_items
    from streams.clients.helpers import Publisher
    from streams.recommend import now_ms
    from streams.tools.worker_runner import wait_group_caught_up

    items = read_items(args.file, now_ms(), settings.limits())
    _say(f"{len(items):,} items read and checked from {args.file}; publishing to {settings.items_topic}…")
    with Publisher(settings) as publisher:
        seconds = publish_catalog(publisher, items, _say)
    _say(f"{len(items):,} items published in {seconds:.1f} s")
    if args.wait:
        _say(f"waiting for the workers of {settings.app_id!r} to embed them…")
        wait_group_caught_up(settings, settings.items_topic, args.wait_timeout)
        _say("the catalogue is in the vector store: the items are recommendable")
    return 0


def cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    import itertools
    import secrets

    from streams.clients.catalog_load import publish_catalog
    from streams.clients.helpers import Publisher
    from streams.recommend import now_ms
    from streams.tools.workload import Workload, WorkloadConfig

    if args.rate <= 0 or args.events < 0 or args.users < 1 or args.items < 1:
        raise ConfigError("produce: --rate, --users and --items must be > 0, --events >= 0")
    workload = Workload(WorkloadConfig(n_items=args.items, n_users=args.users))
    with Publisher(settings) as publisher:
        if not args.no_catalog:
            _say(f"publishing the generated catalogue of {len(workload.catalog):,} items…")
            publish_catalog(publisher, workload.catalog, _say)
        # Fresh users each run: the same seeded event ids again would be (rightly) deduplicated.
        first_user = secrets.randbelow(1_000_000) * 1_000
        total = args.events or None
        _say(
            f"streaming {'events' if total is None else f'{total:,} events'} of {args.users} users at {args.rate:g}/s…"
        )
        started = last = time.monotonic()
        stream = workload.stream(total or 2**62, clock=now_ms, first_user=first_user)
        for n, generated in zip(itertools.count(1), stream, strict=False):
            pause = started + n / args.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            publisher.publish_event(generated.event)
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                _say(f"  {n:,} events sent ({n / (last - started):,.0f}/s)")
    return 0


def _format_recommendation(rec: Recommendation, now: int) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(rec.emitted_ts / 1000))
    items = ", ".join(f"{i.item_id} ({i.score:.2f})" for i in rec.items[:5])
    more = f" +{len(rec.items) - 5}" if len(rec.items) > 5 else ""
    reason = f"  top: {rec.items[0].reason}" if rec.items else ""
    variant = f"  ({rec.experiment}: {rec.variant})" if rec.experiment else ""
    return f"{clock}  {rec.user_id} → {items}{more}  [{now - rec.event_ts} ms after the event]{reason}{variant}"


def cmd_experiment_report(settings: Settings, args: argparse.Namespace) -> int:
    from streams.experiments.config import load_experiment
    from streams.experiments.report import experiment_report, pick_timeline, read_timelines, render_text, write_plots

    declared = load_experiment(Path(settings.experiments), settings) if settings.experiments else None
    timeline = pick_timeline(read_timelines(settings), args.name or (declared.name if declared else None))
    order = [v.name for v in declared.variants] if declared and declared.name == timeline.experiment else None
    if order is None and not args.control:
        _note("no experiment file names the control: the variant with the most users is taken (--control to choose)")
    report = experiment_report(timeline, order, args.control)
    print(json.dumps(report, indent=2) if args.format == "json" else render_text(report))
    if args.plots:
        write_plots(report, Path(args.plots), progress=_note)
    return 0


def cmd_tail(settings: Settings, args: argparse.Namespace) -> int:
    from streams.clients.helpers import RecommendationReader
    from streams.recommend import now_ms

    shown = 0
    idle_since = time.monotonic()
    with RecommendationReader(settings, from_beginning=args.from_beginning) as reader:
        _say(f"following {settings.recommendations_topic} (Ctrl-C to stop)…")
        while not (args.idle_timeout and time.monotonic() - idle_since > args.idle_timeout):
            for rec in reader.poll(0.5):
                idle_since = time.monotonic()
                if args.user and rec.user_id not in args.user:
                    continue
                print(_format_recommendation(rec, now_ms()), flush=True)
                shown += 1
                if args.count and shown >= args.count:
                    return 0
    return 0


def _model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = [name for name, _, _ in InterestEncoderConfig.hyper_parameters()]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _encoder_config(args: argparse.Namespace, **fields: Any) -> InterestEncoderConfig:
    try:
        return InterestEncoderConfig(**(fields | _model_overrides(args)))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{args.command}: {exc}") from None


def _load_data(args: argparse.Namespace) -> Dataset:
    from encoder.datasets import load_dataset

    dataset = load_dataset(args.data, args.format, args.item_text)
    new_items = getattr(args, "new_items", 0.0)
    if not 0.0 <= new_items < 1.0:
        raise ConfigError(f"--new-items is a share of the items in [0, 1), got {new_items}")
    return dataset.with_new_items(new_items) if new_items else dataset


def _train_from_topics(settings: Settings, args: argparse.Namespace) -> int:
    from encoder.build import ensure_log_encoder
    from infra.kafka_local import local_broker_for
    from streams.clients.topic_log import read_topic_log

    with local_broker_for(settings, _say):
        _say(f"reading {settings.items_topic} and {settings.events_topic} from their start…")
        topics = read_topic_log(settings, _say)
    left_out = ", ".join(f"{n:,} {why}" for why, n in topics.counts.items() if why != "kept") or "none"
    _say(f"{topics.counts['kept']:,} events of {len(topics.log.histories):,} users kept; left out: {left_out}")
    bundle = ensure_log_encoder(settings.models_path, topics.log, _model_overrides(args), _say)
    print(f"interest encoder bundle: {bundle}")
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from encoder.build import ensure_text_encoder, fingerprint, train_and_export
    from encoder.runtime import OnnxTextEmbedder
    from streams.tools.stream_model import ensure_interest_encoder

    if args.from_topics:
        return _train_from_topics(settings, args)
    if args.data is None:
        from streams.tools.workload import WorkloadConfig

        overrides = {"epochs": 8, "patience": 3} | _model_overrides(args)
        bundle = ensure_interest_encoder(
            settings.models_path,
            WorkloadConfig(n_items=args.items, n_users=args.users),
            overrides,
            n_users=args.train_users,
            events_per_user=args.events_per_user,
            force=args.force,
            progress=_say,
        )
        print(f"interest encoder bundle: {bundle}")
        return 0
    dataset = _load_data(args)
    use_text = dataset.item_texts is not None and not args.no_text
    if args.no_ids and not use_text:
        raise ConfigError("train: --no-ids needs item text (this data set has none, or --no-text was given)")
    embedder = OnnxTextEmbedder(ensure_text_encoder(settings.models_path, _say), "cpu") if use_text else None
    cfg = _encoder_config(
        args,
        event_types=dataset.event_types(),
        n_items=0 if args.no_ids else dataset.n_items,
        text_dim=embedder.dim if embedder else 0,
    )
    text_vectors = None
    if embedder is not None and dataset.item_texts is not None:
        _say(f"embedding the text of {dataset.n_items:,} items…")
        text_vectors = embedder.embed_batch(dataset.item_texts)
    bundle = args.out or settings.models_path / f"interest-encoder-{dataset.name}"
    fingerprint_ = fingerprint(cfg, dataset.describe())
    train_and_export(dataset, cfg, bundle, text_vectors, fingerprint_, _say, fp16=args.fp16, int8=args.int8)
    print(f"interest encoder bundle: {bundle}")
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from encoder.build import ensure_text_encoder
    from encoder.evaluate import evaluate, write_report
    from encoder.runtime import OnnxTextEmbedder

    dataset = _load_data(args)
    embedder = None
    if dataset.item_texts is not None:
        embedder = OnnxTextEmbedder(ensure_text_encoder(settings.models_path, _say), "cpu")
    evaluation = evaluate(dataset, args.bundle, embedder, _say, args.precision)
    report = write_report(evaluation, args.report, "rtrec " + " ".join(args.argv))
    width = max(len(r.name) for r in evaluation.results)
    print(f"{'method':<{width}}  Recall@10  NDCG@10  Recall@20  NDCG@20     MRR")
    for r in evaluation.results:
        m = r.metrics
        print(
            f"{r.name:<{width}}  {m['hr@10']:9.4f}  {m['ndcg@10']:7.4f}  {m['hr@20']:9.4f}  {m['ndcg@20']:7.4f}  "
            f"{m['mrr']:6.4f}"
        )
    for group in evaluation.dataset.test_groups:
        print(f"{group} users only:")
        for r in evaluation.results:
            m = r.metrics
            print(f"{r.name:<{width}}  {m[group + ' hr@10']:9.4f}  {m[group + ' ndcg@10']:7.4f}")
    print(f"report: {report}")
    return 0


def cmd_stream_eval(settings: Settings, args: argparse.Namespace) -> int:
    from encoder.datasets import load_event_log
    from streams.tools.stream_eval import StreamEvalOptions, format_table, run_stream_eval, write_report

    options = StreamEvalOptions(
        train_fraction=args.train_fraction,
        rate=args.rate,
        wait_for_answers=not args.no_wait,
        model_dir=args.model_dir,
        encoder_overrides=_model_overrides(args),
    )
    log = load_event_log(args.data, args.format, args.item_text)
    result = run_stream_eval(settings, log, options, _say)
    print(format_table(result))
    print(f"report: {write_report(result, log, args.report, 'rtrec ' + ' '.join(args.argv))}")
    return 0


def cmd_worker(settings: Settings, _args: argparse.Namespace) -> int:
    import faust

    from streams.worker.app import build_app, load_components

    logging.basicConfig(level=settings.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    components = load_components(settings)
    logging.getLogger("rtrec").info(
        "interest encoder %s on %s; text encoder on %s",
        components.interest_encoder.version,
        components.interest_encoder.provider,
        components.text_embedder.provider,
    )
    app = build_app(settings, components)
    # The modules, models and app built so far live as long as the worker: kept out of the collector's
    # full passes, which otherwise scan them all (~150k objects, ~130 ms on a 2-core EPYC) and stall every
    # thread, so each pass was a spike in the event-to-list latency.
    gc.freeze()
    faust.Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from streams.tools.demo import DemoOptions, run_demo

    options = DemoOptions(
        events=args.events, rate=args.rate, users=args.users, items=args.items, keep_broker=args.keep_broker
    )
    tally = run_demo(settings, options, _say)
    return 0 if len(tally.covered) >= tally.sent - tally.bad_sent else 1


def cmd_bench_encoder(settings: Settings, args: argparse.Namespace) -> int:
    from encoder.speed import format_table, run_encoder_bench

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise ConfigError(f"bench-encoder: --batches must be comma-separated integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1 or args.length < 1 or args.seconds <= 0:
        raise ConfigError("bench-encoder: batches and --length must be >= 1, --seconds > 0")
    rows = run_encoder_bench(args.bundle, batches, args.length, args.seconds, settings.encoder_threads, _say)
    print(format_table(rows, args.length))
    return 0


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from streams.tools.bench import BenchOptions, run_bench

    options = BenchOptions(
        items=args.items,
        users=args.users,
        events=args.events,
        baseline_events=args.baseline_events,
        rate=args.rate,
        rate_seconds=args.rate_seconds,
        workers=args.workers,
        seed=args.seed,
        seed_state=args.seed_state,
        experiment=str(args.experiment or ""),
        keep_run_data=args.keep_run_data,
    )
    run_bench(settings, options, _say)
    return 0


# ------------------------------------------------------------------ parser


def _add_data_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    from encoder.datasets import FORMATS

    parser.add_argument("--data", type=Path, required=required, help="data set file or folder")
    parser.add_argument("--format", choices=FORMATS, default="generic", help="layout of --data (see README)")
    parser.add_argument("--item-text", type=Path, help="generic format: a file of item_id, text")


def _add_new_items_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--new-items",
        type=float,
        default=0.0,
        help="hold this share of the items (seeded) out of training, as if published after it; "
        "evaluate the bundle with the same value to rank them cold",
    )


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    for name, kind, described in InterestEncoderConfig.hyper_parameters():
        text = described.replace("%", "%%")  # argparse formats help with %, and a help may say "95 %"
        if kind is bool:
            parser.add_argument(_flag(name), action="store_const", const=True, default=None, help=text)
        else:
            parser.add_argument(_flag(name), type=kind, default=None, help=text)


def _add_generated_stream_flags(parser: argparse.ArgumentParser, *, events: int, events_help: str, rate: float) -> None:
    """The generated workload's shape: the same for the demo and the demo producer."""
    parser.add_argument("--events", type=int, default=events, help=events_help)
    parser.add_argument("--rate", type=float, default=rate, help="events per second")
    parser.add_argument("--users", type=int, default=200, help="distinct users")
    parser.add_argument("--items", type=int, default=800, help="catalogue size (as `rtrec train` was given)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtrec", description="Event-streaming real-time recommender.", allow_abbrev=False
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    _add_settings_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    config.add_argument(
        "--markdown", action="store_true", help="print every setting's table for docs/configuration.md instead"
    )
    config.set_defaults(run=cmd_config)

    broker = sub.add_parser("broker", help="the local single-node Kafka (KRaft) assembled from Maven Central")
    broker.add_argument("action", choices=["start", "stop", "status"])
    broker.set_defaults(run=cmd_broker)

    qdrant = sub.add_parser("qdrant", help="a local Qdrant server (the several-workers topology, without Docker)")
    qdrant.add_argument("action", choices=["start", "stop", "status"])
    qdrant.set_defaults(run=cmd_qdrant)

    sub.add_parser("topics", help="create or update the pipeline's topics (idempotent)").set_defaults(run=cmd_topics)

    train = sub.add_parser(
        "train",
        help="train + export the interest encoder: on the generated workload (the stream's model), or on --data",
    )
    _add_data_flags(train, required=False)
    _add_new_items_flag(train)
    train.add_argument(
        "--from-topics",
        action="store_true",
        help="train the stream's model on a replay of the pipeline's own catalogue and events topics "
        "(into MODELS_DIR/interest-encoder; forgotten users' events are left out)",
    )
    train.add_argument("--out", type=Path, help="bundle folder for --data (default: MODELS_DIR/interest-encoder-NAME)")
    train.add_argument("--no-text", action="store_true", help="ignore item text: an id-only model")
    train.add_argument("--no-ids", action="store_true", help="no id embeddings: a text-only model")
    train.add_argument("--items", type=int, default=800, help="catalogue size of the generated workload")
    train.add_argument("--users", type=int, default=200, help="live users of the generated workload")
    train.add_argument("--train-users", type=int, default=300, help="generated users to train on")
    train.add_argument("--events-per-user", type=int, default=40, help="history length of each training user")
    train.add_argument("--force", action="store_true", help="retrain even if an identical bundle exists")
    train.add_argument("--fp16", action="store_true", help="also export the float16 user tower (for CUDA workers)")
    train.add_argument("--int8", action="store_true", help="also export the user tower with int8 weights (for CPU)")
    _add_model_flags(train)
    train.set_defaults(run=cmd_train)

    evaluate = sub.add_parser(
        "evaluate", help="leave-one-out, full-ranking evaluation of an exported model next to baselines"
    )
    _add_data_flags(evaluate, required=True)
    _add_new_items_flag(evaluate)
    evaluate.add_argument("--bundle", type=Path, required=True, help="the exported interest-encoder bundle")
    evaluate.add_argument("--report", type=Path, default=Path("report"), help="folder for report.md, plots, JSON")
    evaluate.add_argument(
        "--precision",
        choices=[p for p in PRECISIONS if p != "auto"],
        default="fp32",
        help="which exported user tower to score",
    )
    evaluate.set_defaults(run=cmd_evaluate)

    stream_eval = sub.add_parser(
        "stream-eval",
        help="replay a timestamped log through the broker and a worker; prequential HR@10/NDCG@10 of the lists "
        "users held, next to the same model offline and a popularity stream",
    )
    _add_data_flags(stream_eval, required=True)
    stream_eval.add_argument(
        "--train-fraction", type=float, default=0.8, help="events before this quantile of time train and warm up"
    )
    stream_eval.add_argument("--rate", type=float, default=200.0, help="events/s of the scored replay (0: max)")
    stream_eval.add_argument(
        "--no-wait",
        action="store_true",
        help="send in strict event-time order; by default a user's next event waits for the answer to their last",
    )
    stream_eval.add_argument(
        "--model-dir", type=Path, help="a folder with both bundles to use instead of training on the log"
    )
    stream_eval.add_argument("--report", type=Path, default=Path("stream-report"), help="folder for the report")
    _add_model_flags(stream_eval)
    stream_eval.set_defaults(run=cmd_stream_eval)

    forget = sub.add_parser(
        "forget",
        help="forget users: their windows, vectors and cached state are deleted; later events start afresh",
    )
    forget.add_argument("user_ids", nargs="+", metavar="USER_ID")
    forget.set_defaults(run=cmd_forget)

    load_items = sub.add_parser(
        "load-items",
        help="publish a catalogue file (CSV, JSONL or Parquet) to the items topic, checked first, with progress",
        description="Columns: item_id and title (required), description, category, tags (a list, or a|b|c in "
        "CSV), price, available (true/false), ts (epoch s or ms; default now). A file with any bad row sends nothing.",
    )
    load_items.add_argument("file", type=Path, help="the catalogue file (.csv, .jsonl or .parquet)")
    load_items.add_argument("--wait", action="store_true", help="wait until the workers have embedded every item")
    load_items.add_argument("--wait-timeout", type=float, default=600.0, help="seconds --wait waits at most")
    load_items.set_defaults(run=cmd_load_items)

    produce = sub.add_parser(
        "produce",
        help="a demo producer for a running cluster: the generated catalogue, then drifting users' events",
    )
    _add_generated_stream_flags(produce, events=0, events_help="events to send (0: until stopped)", rate=50.0)
    produce.add_argument("--no-catalog", action="store_true", help="send events only (the catalogue is there)")
    produce.set_defaults(run=cmd_produce)

    tail = sub.add_parser("tail", help="print recommendations live as they arrive on the output topic")
    tail.add_argument("--from-beginning", action="store_true", help="first replay what the topic retains")
    tail.add_argument("--user", action="append", metavar="USER_ID", help="only these users (repeatable)")
    tail.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    tail.add_argument("--idle-timeout", type=float, default=0.0, help="stop after this many quiet seconds (0: never)")
    tail.set_defaults(run=cmd_tail)

    experiment = sub.add_parser("experiment", help="experiments run inside the stream (docs/experiments.md)")
    experiment_sub = experiment.add_subparsers(dest="experiment_command", required=True)
    report = experiment_sub.add_parser(
        "report", help="each variant's online metrics with 95%% intervals and p-values against the control"
    )
    report.add_argument("--name", help="the experiment (default: the one in RTREC_EXPERIMENTS, or the only one)")
    report.add_argument("--control", help="the variant to compare against (default: the file's first variant)")
    report.add_argument("--format", choices=("text", "json"), default="text")
    report.add_argument("--plots", metavar="DIR", help="also write the metrics over time as a PNG into DIR")
    report.set_defaults(run=cmd_experiment_report)

    sub.add_parser("worker", help="run a stream worker (scale out: one per core, same app id)").set_defaults(
        run=cmd_worker
    )

    bench = sub.add_parser(
        "bench",
        help="throughput and latency of the live pipeline next to a naive baseline (one event per batch)",
        description="Partitions, window length, batch limits and the store (embedded, or --qdrant-url) are the "
        "settings given before `bench`, e.g. `rtrec --topic-partitions 8 --batch-max 512 bench --workers 2`.",
    )
    bench.add_argument("--items", type=int, default=100_000, help="catalogue size")
    bench.add_argument("--users", type=int, default=1_000, help="distinct users (each gets a full window first)")
    bench.add_argument("--events", type=int, default=20_000, help="events of the max-rate throughput phase")
    bench.add_argument("--baseline-events", type=int, default=1_000, help="events of the naive baseline phase")
    bench.add_argument(
        "--rate", type=float, default=1_000.0, help="events/s of the fixed-rate latency phase (0: skip it)"
    )
    bench.add_argument(
        "--rate-seconds",
        type=float,
        default=20.0,
        help="length of each latency phase: at --rate, and at 50%% and 80%% of the measured capacity",
    )
    bench.add_argument("--workers", type=int, default=1, help="worker processes (one per core)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the generated events")
    bench.add_argument(
        "--seed-state",
        action="store_true",
        help="write every user's window straight to the state changelog instead of the warm-up's events "
        "(for 1M users; the worker recovers them at start)",
    )
    bench.add_argument(
        "--experiment",
        type=Path,
        metavar="FILE",
        help="also run the throughput phase's users again with this experiment file (docs/experiments.md), "
        "next to the run without",
    )
    bench.add_argument(
        "--keep-run-data",
        action="store_true",
        help="keep the run's topics and stores for inspection (by default only its logs and results stay: "
        "a default run's topics take ~2 GB)",
    )
    bench.set_defaults(run=cmd_bench)

    bench_encoder = sub.add_parser(
        "bench-encoder",
        help="user vectors/s of the interest encoder on CPU, and on CUDA in float32 and float16 where present",
        description="Threads per call are the global --encoder-threads setting.",
    )
    bench_encoder.add_argument("--bundle", type=Path, help="an exported bundle (default: untrained, stream-shaped)")
    bench_encoder.add_argument("--batches", default="1,64,256,1024", help="comma-separated windows per call")
    bench_encoder.add_argument("--length", type=int, default=50, help="events per window")
    bench_encoder.add_argument("--seconds", type=float, default=2.0, help="timed seconds per row")
    bench_encoder.set_defaults(run=cmd_bench_encoder)

    demo = sub.add_parser("demo", help="broker + topics + models + worker + live stream, with a summary")
    _add_generated_stream_flags(demo, events=3000, events_help="events to stream", rate=200.0)
    demo.add_argument("--keep-broker", action="store_true", help="leave the local broker running afterwards")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for reports that say how they were made
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

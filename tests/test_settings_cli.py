"""Settings from the environment and flags; the CLI's one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from encoder.config import InterestEncoderConfig
from streams.cli import main
from streams.clients.catalog_load import item_from_row
from streams.errors import ConfigError, InvalidRecord
from streams.settings import Secret, Settings, reference_table, spec_of


def test_environment_values_are_parsed_and_typed() -> None:
    settings = Settings.from_env(
        {"RTREC_TOPIC_PARTITIONS": "8", "RTREC_BATCH_WITHIN_S": "0.1", "RTREC_HOME": "/tmp/x", "PATH": "/bin"}
    )
    assert settings.topic_partitions == 8
    assert settings.batch_within_s == 0.1
    assert settings.home == Path("/tmp/x")
    assert settings.models_path == Path("/tmp/x/models")
    assert settings.bootstrap_servers == "127.0.0.1:19092" and settings.uses_local_kafka


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RTREC_TOPIC_PARTITIONS": "many"}, "RTREC_TOPIC_PARTITIONS: cannot parse 'many'"),
        ({"RTREC_TOPIC_PARTITION": "4"}, "unknown setting(s): RTREC_TOPIC_PARTITION"),
        ({"RTREC_WINDOW_SIZE": "0"}, "RTREC_WINDOW_SIZE must be >= 1"),
        ({"RTREC_ENCODER_PROVIDER": "tpu"}, "RTREC_ENCODER_PROVIDER must be one of auto, cpu, cuda, got 'tpu'"),
        ({"RTREC_RERANK_DIVERSITY": "1.0"}, "RTREC_RERANK_DIVERSITY must be in [0, 1), got 1.0"),
        ({"RTREC_RERANK_DIVERSITY": "-0.1"}, "RTREC_RERANK_DIVERSITY must be in [0, 1), got -0.1"),
        ({"RTREC_RERANK_FRESHNESS_HALF_LIFE_H": "-1"}, "RTREC_RERANK_FRESHNESS_HALF_LIFE_H must be >= 0"),
        ({"RTREC_RERANK_DISLIKE_PENALTY": "-0.5"}, "RTREC_RERANK_DISLIKE_PENALTY must be >= 0"),
        ({"RTREC_RERANK_BOUGHT_DUPLICATE_SIMILARITY": "1.5"}, "must be in [0, 1], got 1.5"),
        ({"RTREC_KAFKA_SESSION_TIMEOUT_S": "5"}, "RTREC_KAFKA_SESSION_TIMEOUT_S must be in [6, 300], got 5.0"),
        ({"RTREC_HTTP_PORT": "70000"}, "RTREC_HTTP_PORT must be a TCP port (0: off), got 70000"),
        ({"RTREC_TABLE_STORE": "redis://"}, "RTREC_TABLE_STORE must be memory:// or rocksdb://, got 'redis://'"),
        ({"RTREC_QDRANT_CA_CERT": "/no/such/ca.pem"}, "RTREC_QDRANT_CA_CERT: no such file '/no/such/ca.pem'"),
        (
            {"RTREC_TOPIC_MIN_INSYNC_REPLICAS": "2"},
            "RTREC_TOPIC_MIN_INSYNC_REPLICAS (2) must be at most RTREC_TOPIC_REPLICATION (1)",
        ),
        (
            {"RTREC_QDRANT_REPLICATION_FACTOR": "2", "RTREC_QDRANT_WRITE_CONSISTENCY_FACTOR": "3"},
            "RTREC_QDRANT_WRITE_CONSISTENCY_FACTOR (3) must be at most RTREC_QDRANT_REPLICATION_FACTOR (2)",
        ),
        ({"RTREC_ENCODER_PRECISION": "int4"}, "RTREC_ENCODER_PRECISION must be one of auto, fp32, fp16, int8"),
    ],
)
def test_bad_settings_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert message in str(caught.value)


def test_flags_override_the_environment_and_secrets_stay_masked() -> None:
    settings = Settings.from_env({"RTREC_TOP_K": "5", "RTREC_QDRANT_API_KEY": "hunter2"}).with_overrides(top_k="7")
    assert settings.top_k == 7
    assert settings.qdrant_api_key == Secret("hunter2")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.describe())


def test_config_command_prints_every_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RTREC_QDRANT_API_KEY", "hunter2")
    assert main(["--top-k", "12", "config"]) == 0
    out = capsys.readouterr().out
    assert "RTREC_TOP_K" in out and " 12\n" in out
    assert "hunter2" not in out


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streams", "--window-size", "-3", "config"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "rtrec: error: RTREC_WINDOW_SIZE must be >= 1, got -3"
    missing = subprocess.run(
        [sys.executable, "-m", "streams", "--model-dir", str(tmp_path), "worker"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("rtrec: error: no interest-encoder bundle at")
    assert "Traceback" not in missing.stderr
    bad_window = subprocess.run(
        [sys.executable, "-m", "streams", "--model-dir", str(tmp_path), "train", "--max-len", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad_window.returncode == 2
    assert bad_window.stderr.strip() == "rtrec: error: interest encoder: max_len must be >= 1, got 0"


def test_load_items_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load-items", str(tmp_path / "absent.csv")]) == 2
    assert capsys.readouterr().err == f"rtrec: error: {tmp_path / 'absent.csv'}: no such file\n"
    notes = tmp_path / "items.txt"
    notes.write_text("item_id,title\n")
    assert main(["load-items", str(notes)]) == 2
    assert capsys.readouterr().err == f"rtrec: error: {notes}: expected a .csv, .jsonl or .parquet file\n"


def test_catalogue_rows_become_items_as_the_worker_reads_them() -> None:
    limits = Settings().limits()
    row = {
        "item_id": "i-1",
        "title": " Lamp ",
        "tags": "desk| light |",
        "price": "12.5",
        "available": "false",
        "ts": "1700000000",
    }
    item = item_from_row(row, now_ms=5, limits=limits)
    assert (item.title, item.tags, item.price, item.available, item.ts) == (
        "Lamp",
        ("desk", "light"),
        12.5,
        False,
        1_700_000_000_000,
    )
    parquet_like = {"item_id": "i-2", "title": "Chair", "tags": ["a"], "price": None, "available": True, "ts": None}
    assert item_from_row(parquet_like, now_ms=5, limits=limits).ts == 5  # no ts: stamped now
    for bad, field in (({"available": "maybe"}, "available"), ({"price": "cheap"}, "price"), ({"tags": [1]}, "tags")):
        with pytest.raises(InvalidRecord) as caught:
            item_from_row({"item_id": "i-3", "title": "T", **bad}, now_ms=5, limits=limits)
        assert caught.value.field == field
    with pytest.raises(InvalidRecord, match="'item_id'"):
        item_from_row({"item_id": "x" * 300, "title": "T"}, now_ms=5, limits=limits)


def test_the_configuration_page_is_generated_from_the_settings() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert reference_table() in page, "docs/configuration.md is stale: paste `rtrec config --markdown` into it"


def test_every_setting_is_described_and_its_default_is_within_its_bounds() -> None:
    for f in dataclasses.fields(Settings):
        spec = spec_of(f)
        assert len(spec.help) > 5, f.name
        assert spec.problem(f.default) is None, f.name


def test_model_flags_are_the_encoder_configs_hyper_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    names = {name for name, _, _ in InterestEncoderConfig.hyper_parameters()}
    assert {"d_model", "dropout", "refit", "loss"} <= names and "event_types" not in names
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert all("--" + name.replace("_", "-") in shown for name in names)

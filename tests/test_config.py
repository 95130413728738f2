"""One config file, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import Config, ConfigError, load_config


def test_defaults_without_a_file_are_the_offline_cpu_stack(tmp_path: Path):
    config = load_config(tmp_path / "absent.toml", environ={})
    assert config == Config()
    assert config.nats.urls == ["nats://127.0.0.1:4222"] and config.stack.target == "targets/cpu_gpt"


def test_the_repository_file_matches_the_built_in_defaults():
    assert load_config(Path(__file__).parent.parent / "autoresearch.toml", environ={}) == Config()


def test_environment_overrides_the_file(tmp_path: Path):
    file = tmp_path / "a.toml"
    file.write_text('[executor]\nslots = 2\nbudget_unit = "steps"\n[nats]\nservers = "nats://a:1, nats://b:2"\n')
    config = load_config(file, environ={"AUTORESEARCH_EXECUTOR_SLOTS": "4", "AUTORESEARCH_PROPOSER_TARGET_BPB": "1.5",
                                        "AUTORESEARCH_DATA": "/elsewhere", "AUTORESEARCH_CONFIG": str(file)})
    assert config.executor.slots == 4 and config.executor.budget_unit == "steps"
    assert config.proposer.target_bpb == 1.5
    assert config.nats.urls == ["nats://a:1", "nats://b:2"]


@pytest.mark.parametrize("text, environ, words", [
    ("[executor]\nslots = 'two'\n", {}, "executor.slots"),
    ("[executor]\nslot = 2\n", {}, "slot"),
    ("[nats\n", {}, "a.toml"),
    ("", {"AUTORESEARCH_LEDGER_HTTP_PORT": "eighty"}, "ledger.http_port"),
    ("", {"AUTORESEARCH_EXECTOR_ACK_WAIT_S": "5"}, "AUTORESEARCH_EXECTOR_ACK_WAIT_S names no setting"),
    ("", {"AUTORESEARCH_LEDGER": "x"}, "AUTORESEARCH_LEDGER names no setting"),
])
def test_a_bad_setting_is_named(tmp_path: Path, text: str, environ: dict[str, str], words: str):
    file = tmp_path / "a.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(file, environ=environ)

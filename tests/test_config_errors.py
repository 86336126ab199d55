"""Configuration problems, from a file or the environment, are one ConfigError naming the key and the source.

Real files in tmp_path, the real environment, the real CLI. The attach-level runtime tests pass once attach()
calls `check_runtime(self.config)` after `load_config`; `check_runtime` is also tested directly.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradflow_agent
from gradflow_agent import config as config_module
from gradflow_agent.config import ConfigError, Section, check_runtime, env_overrides, load_config
from tests.conftest import config

ROOT = Path(__file__).resolve().parents[1]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """No GRADFLOW_* variable from the outer shell, and unknown-variable warnings are fresh per test."""
    for name in [k for k in os.environ if k.startswith("GRADFLOW_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(config_module, "_warned_variables", set())


def _attach(cfg):
    agent = gradflow_agent.attach(torch.nn.Linear(2, 2), cfg)
    agent.detach()


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRADFLOW_")}
    environ.update(env or {})
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "gradflow_agent", "check-config", *args], env=environ, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# -- 1. bad GRADFLOW_* values -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,raw,key", [
    ("GRADFLOW_SAMPLING_WINDOW", "[1", "sampling.window"),
    ("GRADFLOW_STATS_GRADIENTS_ENABLED", "{yes", "stats.gradients.enabled"),
    ("GRADFLOW_THRESHOLDS_EXPLODING", "'10", "thresholds.exploding"),
])
def test_bad_environment_value_names_the_variable_and_the_key(monkeypatch, name, raw, key):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError) as err:
        load_config(config())
    message = str(err.value)
    assert message.startswith(f"environment {name}: key '{key}' must be ") and "\n" not in message
    with pytest.raises(ConfigError, match=name):
        _attach(config())


def test_environment_numbers_in_e_notation_are_numbers(monkeypatch):
    monkeypatch.setenv("GRADFLOW_THRESHOLDS_VANISHING", "1e-8")  # YAML 1.1 reads this as a string
    assert load_config(config()).thresholds.vanishing == 1e-8


def test_list_keys_cannot_be_set_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRADFLOW_MODULES_INCLUDE", "encoder.*")
    with pytest.raises(ConfigError, match=r"environment GRADFLOW_MODULES_INCLUDE: key 'modules.include' is a list"):
        load_config(config())


# -- 2. unknown GRADFLOW_* variables: one warning, never an error ---------------------------------------------


def test_unknown_variable_warns_once_with_a_suggestion(monkeypatch, caplog):
    monkeypatch.setenv("GRADFLOW_SAMPLNG_WINDOW", "9")
    monkeypatch.setenv("GRADFLOW_WRAPPER_TOKEN", "abc")  # another tool's variable
    with caplog.at_level(logging.WARNING, logger="gradflow_agent"):
        _attach(config())
        _attach(config())
        load_config(config())
    warnings = [r.getMessage() for r in caplog.records if r.name == "gradflow_agent" and r.levelno == logging.WARNING
                and "GRADFLOW_" in r.getMessage()]
    typo = [w for w in warnings if "GRADFLOW_SAMPLNG_WINDOW" in w]
    assert len(typo) == 1 and "GRADFLOW_SAMPLING_WINDOW" in typo[0] and "sampling.window" in typo[0]
    assert len([w for w in warnings if "GRADFLOW_WRAPPER_TOKEN" in w]) == 1
    assert len(warnings) == 2


def test_unknown_variable_goes_to_the_warn_callback_not_the_log(caplog):
    seen: list[str] = []
    with caplog.at_level(logging.WARNING, logger="gradflow_agent"):
        cfg = load_config({}, environ={"GRADFLOW_CONFIG_FILE": "x.yaml", "GRADFLOW_SAMPLING_WINDOW": "7"},
                          warn=seen.append)
    assert cfg.sampling.window == 7
    assert len(seen) == 1 and "GRADFLOW_CONFIG_FILE" in seen[0] and "did you mean GRADFLOW_CONFIG" in seen[0]
    assert not [r for r in caplog.records if "GRADFLOW_CONFIG_FILE" in r.getMessage()]


# -- 3. GRADFLOW_CONFIG -----------------------------------------------------------------------------------------


def test_missing_config_file_from_the_environment_names_the_variable_and_path(monkeypatch, tmp_path):
    missing = tmp_path / "missing.yaml"
    monkeypatch.setenv("GRADFLOW_CONFIG", str(missing))
    with pytest.raises(ConfigError) as err:
        load_config()
    assert "GRADFLOW_CONFIG" in str(err.value) and str(missing) in str(err.value) and "not found" in str(err.value)
    with pytest.raises(ConfigError, match="GRADFLOW_CONFIG"):
        gradflow_agent.attach(torch.nn.Linear(2, 2))


def test_config_directory_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADFLOW_CONFIG", str(tmp_path))
    with pytest.raises(ConfigError, match=r"GRADFLOW_CONFIG.*is a directory") as err:
        load_config()
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_invalid_yaml_from_the_environment_is_one_line(monkeypatch, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sampling:\n  window: [1\n")
    monkeypatch.setenv("GRADFLOW_CONFIG", str(path))
    with pytest.raises(ConfigError) as err:
        load_config()
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "GRADFLOW_CONFIG" in message
    assert "not valid YAML" in message and "line" in message


def test_key_errors_in_a_file_from_the_environment_name_file_and_variable(monkeypatch, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  window: 1\n")
    monkeypatch.setenv("GRADFLOW_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"c\.yaml \(from GRADFLOW_CONFIG\): key 'sampling.window' must be"):
        load_config()


@pytest.mark.skipif(AS_ROOT, reason="root reads files whatever their mode")
def test_unreadable_config_file_from_the_environment(monkeypatch, tmp_path):
    path = tmp_path / "secret.yaml"
    path.write_text("run:\n  name: x\n")
    path.chmod(0)
    monkeypatch.setenv("GRADFLOW_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"GRADFLOW_CONFIG.*not readable"):
        load_config()


def test_unreadable_config_file_reported_as_config_error(monkeypatch, tmp_path):
    """The same as above where the tests run as root: the open itself is refused."""
    path = tmp_path / "secret.yaml"
    path.write_text("run:\n  name: x\n")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(config_module, "open", refuse, raising=False)
    monkeypatch.setenv("GRADFLOW_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"secret\.yaml \(from GRADFLOW_CONFIG\): config file not readable"):
        load_config()


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


# -- 4. module globs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["include", "exclude"])
@pytest.mark.parametrize("glob", ["[unclosed", "encoder.[0-9", "a[]", "x[!]"])
def test_unbalanced_glob_names_the_key_and_the_pattern(key, glob):
    with pytest.raises(ConfigError) as err:
        _attach(config(modules={key: ["*", glob]}))
    assert f"key 'modules.{key}'" in str(err.value) and repr(glob) in str(err.value)


def test_balanced_globs_are_accepted():
    cfg = load_config(config(modules={"include": ["*", "[[]x", "enc.[0-9]*", "[]]", "[!a]b"]}), environ={})
    assert list(cfg.modules.include)[-1] == "[!a]b"


# -- 5. runtime checks ------------------------------------------------------------------------------------------


def _prometheus(**kw) -> dict:
    return config(exporters={"prometheus": {"enabled": True, "port": 0, "addr": "127.0.0.1", **kw}})


def _runtime_cases(tmp_path: Path) -> list[tuple[dict, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cert = tmp_path / "cert.pem"
    cert.write_text("not really a certificate")
    return [
        (_prometheus(certfile=str(tmp_path / "nope.pem"), keyfile=str(cert)),
         "key 'exporters.prometheus.certfile' must be a readable PEM file"),
        (_prometheus(certfile=str(cert), keyfile=str(tmp_path / "nope.pem")),
         "key 'exporters.prometheus.keyfile' must be a readable PEM file"),
        (_prometheus(certfile=str(cert)), "key 'exporters.prometheus.certfile'"),  # no key in it, no keyfile
        (_prometheus(keyfile=str(cert)), "key 'exporters.prometheus.certfile'"),
        (_prometheus(web_config_file=str(cert), certfile=str(cert), keyfile=str(cert)),
         "key 'exporters.prometheus.web_config_file'"),
        (_prometheus(certfile=str(tmp_path), keyfile=str(cert)), "is a directory"),
        (_prometheus(addr="not-an-address"), "key 'exporters.prometheus.addr' must be an IP address or a host name"),
        (_prometheus(web_config_file=str(tmp_path / "web.yml")), "key 'exporters.prometheus.web_config_file'"),
        (_prometheus(pushgateway={"url": "ftp://pushgateway:9091"}), "key 'exporters.prometheus.pushgateway.url'"),
        (_prometheus(pushgateway={"url": "http://"}), "key 'exporters.prometheus.pushgateway.url'"),
        (_prometheus(pushgateway={"url": "push gateway"}), "key 'exporters.prometheus.pushgateway.url'"),
        (config(exporters={"otel": {"enabled": True, "endpoint": "collector:4318"}}),
         "key 'exporters.otel.endpoint' must be an http(s) URL"),
        (config(exporters={"jsonl": {"enabled": True, "path": "/proc/x/y.jsonl"}}), "key 'exporters.jsonl.path'"),
        (config(exporters={"jsonl": {"enabled": True, "path": str(a_file / "y.jsonl")}}),
         "key 'exporters.jsonl.path'"),
        (config(exporters={"jsonl": {"enabled": True, "path": str(tmp_path)}}), "key 'exporters.jsonl.path'"),
    ] + ([] if torch.cuda.is_available() else [
        (config(dynamics={"enabled": True, "snapshot_device": "cuda:0"}), "key 'dynamics.snapshot_device'"),
        (config(dynamics={"enabled": True, "snapshot_device": "cuda"}), "key 'dynamics.snapshot_device'"),
    ]) + [
        (config(dynamics={"enabled": True, "snapshot_device": f"cuda:{torch.cuda.device_count()}"}),
         "key 'dynamics.snapshot_device'"),
    ]


def test_check_runtime_names_the_key(tmp_path):
    for cfg, message in _runtime_cases(tmp_path):
        section = load_config(cfg, environ={})
        with pytest.raises(ConfigError) as err:
            check_runtime(section)
        assert str(err.value).startswith("config dict: ") and message in str(err.value), (cfg, str(err.value))
        assert "\n" not in str(err.value)


def test_attach_runs_the_runtime_checks(tmp_path):
    """Needs attach() to call check_runtime(self.config) after load_config."""
    for cfg, message in _runtime_cases(tmp_path):
        with pytest.raises(ConfigError) as err:
            _attach(cfg)
        assert message in str(err.value), (cfg, str(err.value))


def test_attach_rejects_an_unavailable_snapshot_device():
    """Needs attach() to call check_runtime: today this is an AssertionError inside the dynamics plug-in."""
    with pytest.raises(ConfigError, match="dynamics.snapshot_device"):
        _attach(config(dynamics={"enabled": True, "snapshot_device": f"cuda:{torch.cuda.device_count()}"}))


def test_runtime_checks_skip_disabled_exporters(tmp_path):
    cfg = config(exporters={"prometheus": {"enabled": False, "certfile": "/nope.pem", "addr": "not-an-address",
                                           "pushgateway": {"url": "ftp://x"}},
                            "otel": {"enabled": False, "endpoint": "nonsense"},
                            "jsonl": {"enabled": False, "path": "/proc/x/y.jsonl"}},
                 dynamics={"enabled": False, "snapshot_device": "cuda:7"})
    check_runtime(load_config(cfg, environ={}))


def test_runtime_checks_accept_good_values(tmp_path):
    cfg = config(exporters={"prometheus": {"enabled": True, "addr": "localhost",
                                           "pushgateway": {"url": "pushgateway:9091"}},
                            "otel": {"enabled": True, "endpoint": "https://collector:4318/v1/metrics"},
                            "jsonl": {"enabled": True, "path": str(tmp_path / "new" / "dir" / "s.jsonl")}},
                 dynamics={"enabled": True, "snapshot_device": "cpu"})
    check_runtime(load_config(cfg, environ={}))
    assert not (tmp_path / "new").exists()  # checking creates nothing
    for addr in ("", "0.0.0.0", "::", "127.0.0.1"):
        check_runtime(load_config(_prometheus(addr=addr), environ={}))


def test_a_combined_pem_needs_no_keyfile(tmp_path):
    pem = tmp_path / "combined.pem"
    pem.write_text("-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----\n"
                   "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n")
    check_runtime(load_config(_prometheus(certfile=str(pem)), environ={}))
    check_runtime(load_config(_prometheus(certfile=str(pem), keyfile=str(pem)), environ={}))


def test_runtime_error_names_the_variable_that_set_the_value(monkeypatch):
    monkeypatch.setenv("GRADFLOW_EXPORTERS_PROMETHEUS_ADDR", "not-an-address")
    cfg = load_config(_prometheus())
    assert env_overrides(cfg) == {"exporters.prometheus.addr": "GRADFLOW_EXPORTERS_PROMETHEUS_ADDR"}
    with pytest.raises(ConfigError, match=r"^environment GRADFLOW_EXPORTERS_PROMETHEUS_ADDR: key "
                                          r"'exporters.prometheus.addr'"):
        check_runtime(cfg)


def test_runtime_error_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("exporters:\n  jsonl:\n    enabled: true\n    path: /proc/x/y.jsonl\n")
    with pytest.raises(ConfigError, match=rf"^{path}: key 'exporters.jsonl.path'"):
        check_runtime(load_config(path, environ={}))
    with pytest.raises(ConfigError, match=r"^my source: key 'exporters.jsonl.path'"):
        check_runtime(load_config(path, environ={}), "my source")


def test_web_config_file_goes_through_the_web_config_loader(tmp_path, monkeypatch):
    import types
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users: {}\n")
    calls: list[str] = []

    def load_web_config(p):
        calls.append(p)
        raise ConfigError(f"{p}: key 'tls_server_config.cert_file' is required")

    monkeypatch.setitem(sys.modules, "gradflow_agent.export.webconfig",
                        types.SimpleNamespace(load_web_config=load_web_config))
    with pytest.raises(ConfigError, match="tls_server_config"):
        check_runtime(load_config(_prometheus(web_config_file=str(web)), environ={}))
    assert calls == [str(web)]


def test_a_bad_web_config_file_is_a_config_error(tmp_path):
    pytest.importorskip("gradflow_agent.export.webconfig")
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n")
    with pytest.raises(ConfigError, match="web.yml"):
        check_runtime(load_config(_prometheus(web_config_file=str(web)), environ={}))


# -- 6. Section copies ------------------------------------------------------------------------------------------


def test_section_deepcopies_and_pickles():
    cfg = load_config(config(run={"labels": {"team": "ml"}}), environ={})
    for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), copy.copy(cfg)):
        assert clone.to_dict() == cfg.to_dict() and clone.sampling.window == 10
        assert dict(clone.run.labels) == {"team": "ml"}
    sub = pickle.loads(pickle.dumps(cfg.exporters.prometheus))
    assert sub.port == cfg.exporters.prometheus.port
    with pytest.raises(AttributeError, match="config has no key exporters.prometheus.nope"):
        sub.nope  # noqa: B018


def test_section_private_names_and_membership():
    cfg = load_config({}, environ={})
    bare = Section.__new__(Section)  # what copy and pickle start from
    with pytest.raises(AttributeError):
        bare._data  # noqa: B018
    with pytest.raises(AttributeError):
        cfg.__nope__  # noqa: B018
    assert "window" in cfg.sampling and "nope" not in cfg.sampling
    assert cfg.sampling.get("nope", 3) == 3


# -- 7. the CLI --------------------------------------------------------------------------------------------------


def test_cli_check_config_file_ok(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  window: 7\n")
    result = _cli(str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok (") and result.stderr == ""
    assert all(len(line.replace(str(path), "FILE")) <= 80 for line in result.stdout.splitlines())


def test_cli_check_config_without_file_sees_what_attach_sees(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  window: 7\n")
    result = _cli(env={"GRADFLOW_CONFIG": str(path), "GRADFLOW_SAMPLING_WINDOW": "9",
                       "GRADFLOW_SAMPLNG_WINDOW": "9"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok (") and "1 key from the environment" in result.stdout
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("gradflow-agent: warning: environment "
                                                         "GRADFLOW_SAMPLNG_WINDOW")
    assert "GRADFLOW_SAMPLING_WINDOW" in warnings[0]
    plain = _cli(cwd=tmp_path)
    assert plain.returncode == 0 and plain.stdout.startswith("default config: ok (")


@pytest.mark.parametrize("make,env,expect", [
    (lambda p: p.write_text("sampling:\n  window: 1\n"), {}, "key 'sampling.window' must be an integer >= 2"),
    (lambda p: None, {"GRADFLOW_SAMPLING_WINDOW": "[1"}, "environment GRADFLOW_SAMPLING_WINDOW: key 'sampling.window'"),
    (lambda p: p.write_text("modules:\n  include: ['[unclosed']\n"), {}, "key 'modules.include' item '[unclosed'"),
    (lambda p: p.write_text("exporters:\n  prometheus:\n    addr: not-an-address\n"), {},
     "key 'exporters.prometheus.addr'"),
    (lambda p: p.write_text("exporters:\n  jsonl:\n    enabled: true\n    path: /proc/x/y.jsonl\n"), {},
     "key 'exporters.jsonl.path'"),
    (lambda p: p.write_text("dynamics:\n  enabled: true\n  snapshot_device: cuda:99\n"), {},
     "key 'dynamics.snapshot_device'"),
])
def test_cli_check_config_errors_are_one_line_exit_2(tmp_path, make, env, expect):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    make(path)
    result = _cli(str(path), env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradflow-agent: error: ") and expect in lines[0], lines
    assert result.stdout == ""


def test_cli_check_config_missing_file_from_the_environment(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = _cli(env={"GRADFLOW_CONFIG": str(missing)})
    assert result.returncode == 2
    assert result.stderr.startswith("gradflow-agent: error: ") and "GRADFLOW_CONFIG" in result.stderr
    assert str(missing) in result.stderr

"""/metrics security and fault containment against real servers and clients: no mocks.

The web configuration file (exporter-toolkit format): basic auth, TLS with client certificates, the
legacy certfile/keyfile, headers, rate limit, ConfigErrors that name the file and the key; the URL for
all interfaces; a close() that keeps its deadline; a scrape fault that is counted, logged once and
still answered with 200. Certificates are made here with the `cryptography` package.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import logging
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradflow_agent
from gradflow_agent import ConfigError
from gradflow_agent.export import prometheus as prom_export
from gradflow_agent.export.metrics import Metric
from gradflow_agent.export.webconfig import load_web_config, web_config_for
from tests.conftest import config
from tests.support.prometheus import PrometheusServer, require_binary

PASSWORD = "s3cret-scrape"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()  # cost 4: fast tests, same code path


# -- certificates -----------------------------------------------------------------------------------------
@dataclass
class Pki:
    dir: Path
    ca: Path  # the CA that signs the server and the good client
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    rogue: Path  # a client certificate from another CA
    rogue_key: Path
    encrypted_key: Path
    other_key: Path  # a key that does not match `server`


def _pki(root: Path) -> Pki:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        pytest.fail("the `cryptography` package is needed to make test certificates: pip install cryptography",
                    pytrace=False)
    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject_key, cn, issuer_key, issuer_cert=None, *, ca=False, sans=(), usage=None):
        builder = (x509.CertificateBuilder().subject_name(name(cn))
                   .issuer_name(issuer_cert.subject if issuer_cert else name(cn))
                   .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path, obj, password=None):
        if isinstance(obj, x509.Certificate):
            data = obj.public_bytes(serialization.Encoding.PEM)
        else:
            enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
            data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
        path.write_bytes(data)
        return path

    ca_key, rogue_ca_key = key(), key()
    ca = cert(ca_key, "gradflow test CA", ca_key, ca=True)
    rogue_ca = cert(rogue_ca_key, "rogue CA", rogue_ca_key, ca=True)
    server_key, client_key, rogue_key = key(), key(), key()
    hosts = {"localhost", socket.gethostname(), socket.getfqdn()}
    server = cert(server_key, "gradflow-agent", ca_key, ca,
                  sans=[*(x509.DNSName(h) for h in sorted(hosts)), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                  usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = cert(client_key, "prometheus", ca_key, ca, sans=[x509.DNSName("prometheus.example")],
                  usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = cert(rogue_key, "prometheus", rogue_ca_key, rogue_ca, sans=[x509.DNSName("prometheus.example")],
                 usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(dir=root, ca=write(root / "ca.pem", ca), server=write(root / "server.pem", server),
               server_key=write(root / "server.key", server_key), client=write(root / "client.pem", client),
               client_key=write(root / "client.key", client_key), rogue=write(root / "rogue.pem", rogue),
               rogue_key=write(root / "rogue.key", rogue_key),
               encrypted_key=write(root / "encrypted.key", server_key, password=b"passphrase"),
               other_key=write(root / "other.key", key()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return _pki(tmp_path_factory.mktemp("pki"))


# -- helpers ----------------------------------------------------------------------------------------------
def _model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def _attach(model=None, **prometheus):
    model = model or _model()
    agent = gradflow_agent.attach(model, config(exporters={"prometheus": {
        "enabled": True, "port": 0, "addr": "127.0.0.1", **prometheus}}))
    for _ in range(3):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        agent.step()
    agent.snapshot()
    return agent


def _web_config(directory: Path, text: str, name: str = "web.yml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def _tls_client(pki: Pki, cert: Path | None = None, key: Path | None = None,
                max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def _get(url: str, ctx: ssl.SSLContext | None = None, user: str | None = None, password: str | None = None):
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return urllib.request.urlopen(request, timeout=10, context=ctx)


def _status(url: str, **kwargs) -> int:
    try:
        with _get(url, **kwargs) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _refused(url: str, ctx: ssl.SSLContext) -> BaseException:
    """The connection fails at the TLS level (not with an HTTP status)."""
    try:
        with _get(url, ctx=ctx) as resp:
            pytest.fail(f"expected the TLS handshake to fail, got HTTP {resp.status}")
    except urllib.error.HTTPError as exc:
        pytest.fail(f"expected the TLS handshake to fail, got HTTP {exc.code}")
    except OSError as exc:  # URLError(SSLError), SSLError, ConnectionResetError, RemoteDisconnected
        return exc
    raise AssertionError("unreachable")


def _scrape_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


# -- basic auth -------------------------------------------------------------------------------------------
def test_basic_auth_accepts_the_right_password_and_answers_401_otherwise(tmp_path, monkeypatch):
    web = _web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{HASH}'\n"
                                "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
    checks = []
    real_checkpw = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda pw, h: checks.append(1) or real_checkpw(pw, h))  # a spy
    agent = _attach(web_config_file=str(web))
    try:
        url = agent.prometheus_url
        assert url.startswith("http://127.0.0.1:")
        with _get(url, user="prometheus", password=PASSWORD) as resp:
            assert resp.status == 200 and resp.headers["X-Content-Type-Options"] == "nosniff"
            assert b"gradflow_steps_total" in resp.read()
        for _ in range(3):
            assert _status(url, user="prometheus", password=PASSWORD) == 200
        assert len(checks) == 1  # bcrypt once; then the verified credentials are cached
        for kwargs in ({"user": "prometheus", "password": "wrong"}, {"user": "nobody", "password": PASSWORD}, {},
                       {"user": "prometheus", "password": "x" * 100}):
            with pytest.raises(urllib.error.HTTPError) as err:
                _get(url, **kwargs)
            assert err.value.code == 401, kwargs
            assert err.value.headers["WWW-Authenticate"] == 'Basic realm="gradflow_agent"'
            assert b"gradflow" not in err.value.read()
        assert len(checks) == 4  # a failure is never cached; an unknown user still pays one bcrypt check
        assert agent.errors.total == 0
    finally:
        agent.detach()


def test_rate_limit_answers_429_past_the_burst(tmp_path):
    web = _web_config(tmp_path, "rate_limit:\n  interval: 1h\n  burst: 2\n")
    agent = _attach(web_config_file=str(web))
    try:
        assert [_status(agent.prometheus_url) for _ in range(3)] == [200, 200, 429]
    finally:
        agent.detach()


# -- TLS and client certificates --------------------------------------------------------------------------
def test_require_and_verify_client_cert(pki):
    # Relative paths are relative to the web config file's directory (the tests run from the repo root).
    web = _web_config(pki.dir, "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
                               "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n",
                      name="mtls.yml")
    agent = _attach(web_config_file=str(web))
    try:
        url = agent.prometheus_url
        assert url.startswith("https://127.0.0.1:")
        with _get(url, ctx=_tls_client(pki, pki.client, pki.client_key)) as resp:
            assert resp.status == 200 and b"gradflow_steps_total" in resp.read()
        _refused(url, _tls_client(pki))  # no certificate (TLS 1.3: refused at the first read)
        port = urllib.parse.urlsplit(url).port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                pytest.raises(ssl.SSLError):  # TLS 1.2: the handshake itself fails
            _tls_client(pki, max_version=ssl.TLSVersion.TLSv1_2).wrap_socket(raw, server_hostname="127.0.0.1")
        _refused(url, _tls_client(pki, pki.rogue, pki.rogue_key))  # signed by another CA
        assert _status(url, ctx=_tls_client(pki, pki.client, pki.client_key)) == 200  # still serving
        assert agent.errors.total == 0  # refused clients are not agent errors
    finally:
        agent.detach()


def test_verify_client_cert_if_given(pki, tmp_path):
    web = _web_config(tmp_path, f"tls_server_config:\n  cert_file: {pki.server}\n  key_file: {pki.server_key}\n"
                                f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {pki.ca}\n")
    agent = _attach(web_config_file=str(web))
    try:
        url = agent.prometheus_url
        assert _status(url, ctx=_tls_client(pki)) == 200  # no certificate: allowed
        assert _status(url, ctx=_tls_client(pki, pki.client, pki.client_key)) == 200
        _refused(url, _tls_client(pki, pki.rogue, pki.rogue_key))  # a certificate that does not verify
    finally:
        agent.detach()


def test_client_allowed_sans(pki, tmp_path):
    web = _web_config(tmp_path, f"tls_server_config:\n  cert_file: {pki.server}\n  key_file: {pki.server_key}\n"
                                f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n"
                                "  client_allowed_sans: [someone-else.example]\n")
    agent = _attach(web_config_file=str(web))
    try:
        _refused(agent.prometheus_url, _tls_client(pki, pki.client, pki.client_key))
    finally:
        agent.detach()
    web.write_text(web.read_text().replace("someone-else.example", "prometheus.example"))
    agent = _attach(web_config_file=str(web))
    try:
        assert _status(agent.prometheus_url, ctx=_tls_client(pki, pki.client, pki.client_key)) == 200
    finally:
        agent.detach()


def test_legacy_certfile_keyfile_still_serve_https(pki):
    agent = _attach(certfile=str(pki.server), keyfile=str(pki.server_key))
    try:
        assert agent.prometheus_url.startswith("https://127.0.0.1:")
        assert _status(agent.prometheus_url, ctx=_tls_client(pki)) == 200
    finally:
        agent.detach()


def test_inline_cert_and_key(pki, tmp_path):
    indent = "\n    ".join
    web = _web_config(tmp_path, "tls_server_config:\n"
                                f"  cert: |\n    {indent(pki.server.read_text().splitlines())}\n"
                                f"  key: |\n    {indent(pki.server_key.read_text().splitlines())}\n")
    agent = _attach(web_config_file=str(web))
    try:
        assert _status(agent.prometheus_url, ctx=_tls_client(pki)) == 200
    finally:
        agent.detach()


def test_promtool_passes_on_an_authenticated_tls_scrape(pki, tmp_path):
    promtool = require_binary("promtool", "prometheus")
    web = _web_config(tmp_path, f"tls_server_config:\n  cert_file: {pki.server}\n  key_file: {pki.server_key}\n"
                                f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    agent = _attach(web_config_file=str(web))
    try:
        with _get(agent.prometheus_url, ctx=_tls_client(pki), user="prometheus", password=PASSWORD) as resp:
            text = resp.read()
    finally:
        agent.detach()
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (done.stdout + done.stderr).decode()


def test_a_real_prometheus_scrapes_over_mtls_with_basic_auth(pki, tmp_path):
    web = _web_config(tmp_path, f"tls_server_config:\n  cert_file: {pki.server}\n  key_file: {pki.server_key}\n"
                                f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n"
                                f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    agent = _attach(web_config_file=str(web))
    try:
        target = urllib.parse.urlsplit(agent.prometheus_url).netloc
        cfg = {"scrape_configs": [{
            "job_name": "secure", "scheme": "https",
            "basic_auth": {"username": "prometheus", "password": PASSWORD},
            "tls_config": {"ca_file": str(pki.ca), "cert_file": str(pki.client), "key_file": str(pki.client_key)},
            "static_configs": [{"targets": [target]}]}]}
        with PrometheusServer(cfg) as prom:
            prom.wait_for_targets(1)
            steps = prom.wait_until(lambda: prom.query('gradflow_steps_total{job="secure"}'), timeout=20,
                                    what="gradflow_steps_total")
            assert float(steps[0]["value"][1]) == 3
    finally:
        agent.detach()


def test_a_stalled_handshake_blocks_neither_scrapes_nor_close(pki):
    agent = _attach(certfile=str(pki.server), keyfile=str(pki.server_key))
    exporter = next(e for e in agent.exporters if isinstance(e, prom_export.PrometheusExporter))
    stalled = socket.create_connection(("127.0.0.1", exporter.port), timeout=10)  # connects, never says hello
    try:
        t0 = time.monotonic()
        assert _status(agent.prometheus_url, ctx=_tls_client(pki)) == 200
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        exporter.close(deadline=time.monotonic() + 2.0)
        assert time.monotonic() - t0 < 2.5
        with pytest.raises(OSError):
            _get(agent.prometheus_url, ctx=_tls_client(pki))
    finally:
        stalled.close()
        agent.detach()


# -- configuration errors ---------------------------------------------------------------------------------
BAD_CONFIGS = {
    "not yaml": ("tls_server_config: [unclosed\n", "", "not valid YAML"),
    "unknown top key": ("basic_auth_user:\n  a: b\n", "basic_auth_user", "unknown key"),
    "unknown tls key": ("tls_server_config:\n  certfile: server.pem\n", "tls_server_config.certfile", "unknown key"),
    "cert not found": ("tls_server_config:\n  cert_file: missing.pem\n  key_file: server.key\n",
                       "tls_server_config.cert_file", "file not found: {dir}/missing.pem"),
    "key missing": ("tls_server_config:\n  cert_file: server.pem\n", "tls_server_config.key_file", "missing"),
    "ca not found": ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
                     "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: nope.pem\n",
                     "tls_server_config.client_ca_file", "file not found"),
    "bad client_auth_type": ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
                             "  client_auth_type: RequireSomething\n", "tls_server_config.client_auth_type",
                             "invalid value 'RequireSomething'"),
    "verify without a CA": ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
                            "  client_auth_type: RequireAndVerifyClientCert\n", "tls_server_config.client_ca_file",
                            "needs client_ca_file"),
    "CA without client auth": ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
                               "  client_ca_file: ca.pem\n", "tls_server_config.client_ca_file", "NoClientCert"),
    "cert is not PEM": ("tls_server_config:\n  cert_file: garbage.pem\n  key_file: server.key\n",
                        "tls_server_config.cert_file", "no PEM certificate"),
    "key does not match": ("tls_server_config:\n  cert_file: server.pem\n  key_file: other.key\n",
                           "tls_server_config.key_file", "cannot load the private key"),
    "encrypted key": ("tls_server_config:\n  cert_file: server.pem\n  key_file: encrypted.key\n",
                      "tls_server_config.key_file", "encrypted"),
    "bad tls version": ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
                        "  min_version: TLS14\n", "tls_server_config.min_version", "TLS14"),
    "cipher suites": ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
                      "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "tls_server_config.cipher_suites",
                      "not supported"),
    "not a bcrypt hash": ("basic_auth_users:\n  alice: plaintext-password\n", "basic_auth_users.alice",
                          "not a bcrypt hash"),
    "users not a mapping": ("basic_auth_users: [alice]\n", "basic_auth_users", "mapping"),
    "header not allowed": ("http_server_config:\n  headers:\n    X-Powered-By: gradflow\n",
                           "http_server_config.headers.X-Powered-By", "can not be configured"),
    "header value": ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                     "http_server_config.headers.X-Frame-Options", "deny"),
    "duplicate key": (f"basic_auth_users:\n  alice: '{HASH}'\n  alice: '{HASH}'\n", "", "duplicate key 'alice'"),
    "rate limit burst": ("rate_limit:\n  interval: 1s\n", "rate_limit.burst", ">= 1"),
    "top level not a mapping": ("- tls_server_config\n", "", "must be a mapping"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_a_malformed_web_config_is_one_config_error_naming_file_and_key(name, pki, tmp_path):
    text, key, problem = BAD_CONFIGS[name]
    for src in ("server.pem", "server.key", "ca.pem", "other.key", "encrypted.key"):
        (tmp_path / src).write_bytes((pki.dir / src).read_bytes())
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    path = _web_config(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_web_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert f": {key}: " in message if key else True, message
    assert problem.format(dir=tmp_path) in message, message


def test_a_missing_web_config_file_names_the_config_key(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yml: exporters\.prometheus\.web_config_file: .*not found"):
        load_web_config(tmp_path / "nope.yml")


def test_web_config_file_and_certfile_together_are_an_error(pki, tmp_path):
    web = _web_config(tmp_path, "basic_auth_users: {}\n")
    with pytest.raises(ConfigError, match="either web_config_file or certfile"):
        web_config_for({"web_config_file": str(web), "certfile": str(pki.server), "keyfile": ""})
    assert web_config_for({"web_config_file": "", "certfile": "", "keyfile": ""}) is None


def test_a_bad_web_config_at_attach_serves_nothing_and_says_why(tmp_path, caplog):
    """attach() raises the ConfigError (config checks run the loader), or, if the exporter meets it first,
    the error is logged and nothing listens: either way no unprotected /metrics."""
    web = _web_config(tmp_path, "basic_auth_users:\n  alice: plaintext\n")
    expected = f"{web}: basic_auth_users.alice: not a bcrypt hash"
    with caplog.at_level(logging.ERROR, logger="gradflow_agent"):
        try:
            agent = _attach(web_config_file=str(web))
        except ConfigError as exc:
            assert expected in str(exc)
            return
    try:
        assert agent.prometheus_url is None
        assert agent.errors.counts["prometheus"] == 1
        assert any(expected in r.getMessage() for r in caplog.records)
    finally:
        agent.detach()


# -- the URL ----------------------------------------------------------------------------------------------
def test_all_interfaces_url_names_this_machine_and_answers(caplog):
    with caplog.at_level(logging.INFO, logger="gradflow_agent"):
        agent = _attach(addr="0.0.0.0", web_config_file="")
    try:
        url = agent.prometheus_url
        host = urllib.parse.urlsplit(url).hostname
        names = [n for n in (socket.getfqdn(), socket.gethostname()) if n and not n.startswith("localhost")]
        assert host in names or (host == "127.0.0.1" and not names), (url, names)
        assert host not in ("0.0.0.0", "::", "")
        assert _status(url) == 200
        line = next(r.getMessage() for r in caplog.records if url in r.getMessage())
        assert "all interfaces" in line and "exporters.prometheus.addr: 127.0.0.1" in line
        assert "web_config_file" in line and "\n" not in line
    finally:
        agent.detach()


# -- fault containment ------------------------------------------------------------------------------------
class _BadLabels:
    """A plug-in whose metrics carry labels its catalogue entry does not declare, plus one good metric."""

    name = "bad_labels"
    metrics = (Metric("gradflow_test_bad_labels", "gauge", "A metric with mismatched labels.", labels=("layer",)),
               Metric("gradflow_test_good", "gauge", "A well-formed plug-in metric."))

    def on_step(self, agent):
        pass

    def collect(self):
        return [(self.metrics[0], {"lyr": "0"}, 1.0), (self.metrics[1], {}, 7.0)]

    def close(self):
        pass


def test_a_bad_plugin_metric_is_counted_logged_once_and_the_scrape_still_answers(caplog):
    agent = _attach()
    agent.add_plugin(_BadLabels())
    agent.snapshot()
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gradflow_agent"):
            texts = []
            for _ in range(3):
                with _get(agent.prometheus_url) as resp:
                    assert resp.status == 200
                    texts.append(resp.read().decode())
            agent.snapshot()  # a new snapshot rebuilds its families: counted again, not logged again
            with _get(agent.prometheus_url) as resp:
                texts.append(resp.read().decode())
        first, last = texts[0], texts[-1]
        assert _scrape_value(first, "gradflow_agent_errors_total", component="prometheus_scrape") >= 1
        assert _scrape_value(last, "gradflow_agent_errors_total", component="prometheus_scrape") >= 2
        assert _scrape_value(first, "gradflow_test_good") == 7.0  # the other families are all there
        assert _scrape_value(first, "gradflow_steps_total") == 3
        assert "gradflow_test_bad_labels" not in first
        records = [r for r in caplog.records if r.name == "gradflow_agent"]
        assert len(records) == 1, [r.getMessage() for r in records]
        assert "prometheus_scrape" in records[0].getMessage()
    finally:
        agent.detach()


def test_samples_raising_midway_still_serve_what_was_grouped(monkeypatch):
    real = prom_export.samples

    def failing(snap, info, *args):
        for i, sample in enumerate(real(snap, info, *args)):
            if i == 5:
                raise RuntimeError("a sample generator failed midway")
            yield sample

    agent = _attach()
    try:
        with _get(agent.prometheus_url) as resp:  # the attach-time snapshot is rendered before the fault
            resp.read()
        monkeypatch.setattr(prom_export, "samples", failing)
        agent.snapshot()
        with _get(agent.prometheus_url) as resp:
            assert resp.status == 200
            text = resp.read().decode()
        assert "gradflow_grad_pressure" in text  # the first samples
        assert _scrape_value(text, "gradflow_agent_errors_total", component="prometheus_scrape") == 1
        assert agent.errors.counts["prometheus_scrape"] == 1
    finally:
        agent.detach()


def test_snapshot_registry_renders_without_a_server():
    agent = gradflow_agent.attach(_model(), config())
    try:
        agent.step()
        agent.snapshot()
        text = generate_latest(prom_export.snapshot_registry(agent)).decode()
        assert _scrape_value(text, "gradflow_steps_total") == 1
        assert _scrape_value(text, "gradflow_agent_errors_total", component="prometheus_scrape") == 0
        assert agent.prometheus_url is None
    finally:
        agent.detach()

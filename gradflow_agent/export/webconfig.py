"""The Prometheus exporter-toolkit web configuration file (`--web.config.file`) for /metrics.

One file secures every exporter alike (node_exporter, Prometheus itself, this agent). Format:
https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md

Entry points (parsing and validation are pure: they read files, bind nothing, start nothing):

- `load_web_config(path) -> WebConfig`: parse and validate a file; any problem is ONE `ConfigError`
  naming the file and the dotted key (`web.yml: tls_server_config.cert_file: file not found: /x.pem`).
  Certificates, keys and CA bundles are read once, so a broken pair fails here, not at the first scrape.
  `gradflow-agent check-config` calls it when `exporters.prometheus.web_config_file` is set.
- `web_config_for(section) -> WebConfig | None`: what an `exporters.prometheus` section asks for
  (`web_config_file`, else the legacy `certfile`/`keyfile`, else None = plain HTTP); both set is an error.
- `WebConfig.ssl_context()` and `WebConfig.wsgi(app)`: what the exporter serves with.

Supported: `tls_server_config` (`cert_file`/`key_file` or inline `cert`/`key`, `client_auth_type`,
`client_ca_file` or inline `client_ca`, `client_allowed_sans`, `min_version`/`max_version`,
`prefer_server_cipher_suites`), `basic_auth_users` (bcrypt), `http_server_config.headers` (the
toolkit's allow-list), `http_server_config.http2` (accepted; /metrics is served over HTTP/1.1) and
`rate_limit`. Relative paths are relative to the file's directory, as in the toolkit.

Differences from the Go toolkit, each on the safe side:
- Python's `ssl` verifies every client certificate it asks for, so `RequestClientCert` behaves as
  `NoClientCert` (an unverified certificate authorises nothing either way) and `RequireAnyClientCert`
  as `RequireAndVerifyClientCert`. The verifying types need `client_ca_file` (or `client_ca`): trusting
  the system's public CAs for client certificates is never what a scrape target wants.
- `cipher_suites` and `curve_preferences` (Go names) are refused rather than ignored; OpenSSL's
  defaults apply. Encrypted private keys are refused (nothing could type the passphrase).
- The file is read at attach, not at every request: restart (re-attach) to rotate certificates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from ..config import ConfigError

CONFIG_KEY = "exporters.prometheus.web_config_file"
REALM = "gradflow_agent"

# Go's tls.ClientAuthType names -> what Python's ssl can do (see the module docstring).
CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireClientCert": ssl.CERT_REQUIRED,  # the toolkit's old spelling of RequireAnyClientCert
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# The toolkit allows only these response headers, some with fixed values.
EXTRA_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
             "client_allowed_sans", "min_version", "max_version", "prefer_server_cipher_suites",
             "cipher_suites", "curve_preferences")
_UNSUPPORTED_TLS = {"cipher_suites", "curve_preferences"}
_BCRYPT = re.compile(r"\$2[abxy]?\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# -- the parsed configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TLSServerConfig:
    """`tls_server_config` with paths made absolute; inline PEM text stays in `cert`/`key`/`client_ca`."""

    cert_file: str = ""
    key_file: str = ""
    cert: str = ""
    key: str = field(default="", repr=False)
    client_auth_type: str = "NoClientCert"
    client_ca_file: str = ""
    client_ca: str = ""
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True

    @property
    def verify_mode(self) -> ssl.VerifyMode:
        return CLIENT_AUTH_TYPES[self.client_auth_type]

    def ssl_context(self) -> ssl.SSLContext:
        """A server context; raises ssl.SSLError/OSError (load_web_config turns those into ConfigError)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():  # TLS10/TLS11 are deprecated, but the file asked for them
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = TLS_VERSIONS[self.min_version]
            ctx.maximum_version = TLS_VERSIONS[self.max_version]
        if self.prefer_server_cipher_suites:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file, password=_no_passphrase)
        else:  # inline PEM (or a combined cert+key file): ssl only loads from files
            with tempfile.TemporaryDirectory(prefix="gradflow-tls-") as tmp:  # 0700, removed at once
                cert = self.cert_file or _write_private(Path(tmp, "cert.pem"), self.cert)
                key = self.key_file or (_write_private(Path(tmp, "key.pem"), self.key) if self.key else None)
                ctx.load_cert_chain(cert, key, password=_no_passphrase)
        if self.verify_mode != ssl.CERT_NONE:
            ctx.load_verify_locations(cafile=self.client_ca_file or None, cadata=self.client_ca or None)
        ctx.verify_mode = self.verify_mode
        return ctx

    def allows_peer(self, cert: Mapping[str, Any] | None) -> bool:
        """`client_allowed_sans`: does the verified client certificate name one of them (any SAN kind)?"""
        if not self.client_allowed_sans:
            return True
        allowed = {_normal_san(s) for s in self.client_allowed_sans}
        return any(_normal_san(value) in allowed for _, value in (cert or {}).get("subjectAltName", ()))


@dataclass(frozen=True)
class WebConfig:
    """A validated web configuration. `source` names where it came from, for messages."""

    source: str
    tls: TLSServerConfig | None = None
    basic_auth_users: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    http2: bool = True
    rate_limit_interval: float = 0.0  # seconds between requests (token bucket); 0 = no limit
    rate_limit_burst: int = 0

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def secured(self) -> bool:
        """TLS with verified client certificates, or basic auth: not open to whoever can connect."""
        return bool(self.basic_auth_users) or (self.tls is not None and self.tls.verify_mode == ssl.CERT_REQUIRED)

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.ssl_context() if self.tls is not None else None

    def wsgi(self, app: Callable) -> Callable:
        """`app` behind this file's rate limit, response headers and basic auth (the toolkit's order)."""
        if not (self.basic_auth_users or self.headers or self.rate_limit_interval):
            return app
        return WebApp(app, self)


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys, as the toolkit's strict YAML decoding does."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DuplicateKey(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> bytes:
    """ssl would otherwise prompt on the terminal for an encrypted key's passphrase: a hung training job."""
    raise _EncryptedKey()


def _write_private(path: Path, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return str(path)


def _normal_san(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))  # ssl writes IPv6 SANs uppercase and unabridged
    except ValueError:
        return value


# -- parsing and validation -----------------------------------------------------------------------------
class _Checker:
    """Raises ConfigError as `<file>: <dotted key>: <problem>`."""

    def __init__(self, source: str, base: Path) -> None:
        self.source = source
        self.base = base

    def fail(self, key: str, problem: str) -> None:
        raise ConfigError(": ".join(part for part in (self.source, key, problem) if part))

    def section(self, data: Any, key: str, known: Iterable[str]) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            self.fail(key, f"must be a mapping, got {data!r}")
        known = tuple(known)
        for k in data:
            if k not in known:
                self.fail(f"{key}.{k}" if key else str(k), f"unknown key (known here: {', '.join(known)})")
        return dict(data)

    def string(self, data: Mapping[str, Any], key: str, prefix: str) -> str:
        value = data.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            self.fail(prefix + key, f"must be a string, got {value!r}")
        return value

    def path(self, data: Mapping[str, Any], key: str, prefix: str) -> str:
        value = self.string(data, key, prefix)
        if not value:
            return ""
        path = Path(value) if os.path.isabs(value) else self.base / value
        if not path.is_file():
            self.fail(prefix + key, f"file not found: {path}")
        return str(path)


def load_web_config(path: str | os.PathLike) -> WebConfig:
    """Parse and validate a web configuration file: certificates, keys and hashes included.

    Pure (no socket, no thread), so that `check-config` can run it; raises one ConfigError naming the
    file and the key.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: {CONFIG_KEY}: web configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: {CONFIG_KEY}: cannot read the web configuration file: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    check = _Checker(source, Path(path).resolve().parent)
    top = check.section(data, "", _TOP_KEYS)
    tls = _parse_tls(check, check.section(top.get("tls_server_config"), "tls_server_config", _TLS_KEYS))
    http = check.section(top.get("http_server_config"), "http_server_config", ("http2", "headers"))
    http2 = http.get("http2", True)
    if not isinstance(http2, bool):
        check.fail("http_server_config.http2", f"must be true or false, got {http2!r}")
    headers = _parse_headers(check, http.get("headers"))
    users = _parse_users(check, top.get("basic_auth_users"))
    interval, burst = _parse_rate_limit(check, check.section(top.get("rate_limit"), "rate_limit",
                                                             ("interval", "burst")))
    return WebConfig(source=source, tls=tls, basic_auth_users=MappingProxyType(users),
                     headers=MappingProxyType(headers), http2=http2, rate_limit_interval=interval,
                     rate_limit_burst=burst)


def legacy_web_config(certfile: str, keyfile: str) -> WebConfig:
    """The old `certfile`/`keyfile` keys: a tls_server_config with NoClientCert (the key may be in certfile).

    Relative paths are relative to the working directory, as they always were.
    """
    prefix = "exporters.prometheus."
    check = _Checker("", Path.cwd())
    if keyfile and not certfile:
        check.fail(prefix + "keyfile", "is set without certfile")
    paths = {"certfile": certfile, "keyfile": keyfile}
    cert, key = (check.path(paths, k, prefix) for k in ("certfile", "keyfile"))
    tls = TLSServerConfig(cert_file=cert, key_file=key)
    _validate_tls(check, tls, names={"cert_file": prefix + "certfile",
                                     "key_file": prefix + ("keyfile" if key else "certfile")})
    return WebConfig(source=prefix + "certfile", tls=tls)


def web_config_for(section: Mapping[str, Any]) -> WebConfig | None:
    """What an `exporters.prometheus` config section asks for; None = plain HTTP without auth."""
    path = section.get("web_config_file") or ""
    certfile, keyfile = section.get("certfile") or "", section.get("keyfile") or ""
    if path and (certfile or keyfile):
        raise ConfigError("exporters.prometheus: set either web_config_file or certfile/keyfile, not both "
                          "(put the certificate in the web config file's tls_server_config)")
    if path:
        return load_web_config(path)
    if certfile or keyfile:
        return legacy_web_config(certfile, keyfile)
    return None


def _parse_tls(check: _Checker, data: dict[str, Any]) -> TLSServerConfig | None:
    p = "tls_server_config."
    for key in _UNSUPPORTED_TLS & set(data):
        check.fail(p + key, "not supported by gradflow_agent (Python's ssl uses OpenSSL's defaults); remove it")
    values = {k: check.string(data, k, p) for k in ("cert", "key", "client_ca", "client_auth_type",
                                                    "min_version", "max_version")}
    files = {k: check.path(data, k, p) for k in ("cert_file", "key_file", "client_ca_file")}
    if not any((*files.values(), values["cert"], values["key"], values["client_ca"], values["client_auth_type"])):
        if data:
            check.fail("tls_server_config", "has no cert_file/key_file: TLS would be off")
        return None
    for inline, path in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
        if values[inline] and files[path]:
            check.fail(p + path, f"set either {path} or the inline {inline}, not both")
    if not (files["cert_file"] or values["cert"]):
        check.fail(p + "cert_file", "missing: TLS needs cert_file (or an inline cert)")
    if not (files["key_file"] or values["key"]):
        check.fail(p + "key_file", "missing: TLS needs key_file (or an inline key)")
    auth = values["client_auth_type"] or "NoClientCert"
    if auth not in CLIENT_AUTH_TYPES:
        check.fail(p + "client_auth_type", f"invalid value {auth!r} (one of: {', '.join(CLIENT_AUTH_TYPES)})")
    has_ca = bool(files["client_ca_file"] or values["client_ca"])
    if has_ca and auth == "NoClientCert":
        check.fail(p + "client_ca_file", "a client CA is set but client_auth_type is NoClientCert")
    if CLIENT_AUTH_TYPES[auth] != ssl.CERT_NONE and not has_ca:
        check.fail(p + "client_ca_file", f"client_auth_type {auth} needs client_ca_file (the CA that signs "
                                         "the scrapers' certificates)")
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        versions[key] = values[key] or default
        if versions[key] not in TLS_VERSIONS:
            check.fail(p + key, f"invalid value {versions[key]!r} (one of: {', '.join(TLS_VERSIONS)})")
    if TLS_VERSIONS[versions["min_version"]] > TLS_VERSIONS[versions["max_version"]]:
        check.fail(p + "min_version", f"{versions['min_version']} is above max_version {versions['max_version']}")
    sans = data.get("client_allowed_sans")
    if sans is not None:
        if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
            check.fail(p + "client_allowed_sans", f"must be a list of strings, got {sans!r}")
        if CLIENT_AUTH_TYPES[auth] != ssl.CERT_REQUIRED:
            check.fail(p + "client_allowed_sans", "needs client_auth_type RequireAndVerifyClientCert")
    prefer = data.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        check.fail(p + "prefer_server_cipher_suites", f"must be true or false, got {prefer!r}")
    tls = TLSServerConfig(cert_file=files["cert_file"], key_file=files["key_file"], cert=values["cert"],
                          key=values["key"], client_auth_type=auth, client_ca_file=files["client_ca_file"],
                          client_ca=values["client_ca"], client_allowed_sans=tuple(sans or ()),
                          min_version=versions["min_version"], max_version=versions["max_version"],
                          prefer_server_cipher_suites=prefer)
    _validate_tls(check, tls)
    return tls


def _validate_tls(check: _Checker, tls: TLSServerConfig, names: Mapping[str, str] | None = None) -> None:
    """Load the certificate, key and CA now, so that a bad one names its key before anything listens."""
    names = names or {}

    def key_of(name: str) -> str:
        """The key a problem with `name` (cert_file, key_file, client_ca_file) belongs to: the file, else
        the inline PEM (cert, key, client_ca) when that is what was given."""
        if name in names:
            return names[name]
        inline = name.removesuffix("_file")
        return "tls_server_config." + (inline if not getattr(tls, name) and getattr(tls, inline) else name)

    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        scratch.load_verify_locations(cafile=tls.cert_file or None, cadata=None if tls.cert_file else tls.cert)
    except (ssl.SSLError, OSError, ValueError, TypeError) as exc:
        check.fail(key_of("cert_file"), f"no PEM certificate in it: {exc}")
    if tls.verify_mode != ssl.CERT_NONE:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(
                cafile=tls.client_ca_file or None, cadata=tls.client_ca or None)
        except (ssl.SSLError, OSError, ValueError) as exc:
            check.fail(key_of("client_ca_file"), f"no PEM CA certificate in it: {exc}")
    try:
        tls.ssl_context()
    except _EncryptedKey:
        check.fail(key_of("key_file"), "the private key is encrypted; give an unencrypted key (mode 0600)")
    except (ssl.SSLError, OSError, ValueError) as exc:
        if not (tls.key_file or tls.key):
            check.fail(key_of("key_file"), f"no private key in it, and no key file given: {exc}")
        check.fail(key_of("key_file"), f"cannot load the private key for the certificate: {exc}")


def _parse_headers(check: _Checker, data: Any) -> dict[str, str]:
    key = "http_server_config.headers"
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        check.fail(key, f"must be a mapping, got {data!r}")
    out = {}
    for name, value in data.items():
        if name not in EXTRA_HEADERS:
            check.fail(f"{key}.{name}", f"this header can not be configured (allowed: {', '.join(EXTRA_HEADERS)})")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            check.fail(f"{key}.{name}", f"must be a one-line string, got {value!r}")
        allowed = EXTRA_HEADERS[name]
        if allowed and value not in allowed:
            check.fail(f"{key}.{name}", f"must be one of {', '.join(allowed)}, got {value!r}")
        if value:  # blank = unset, as in the toolkit
            out[name] = value
    return out


def _parse_users(check: _Checker, data: Any) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        check.fail("basic_auth_users", f"must be a mapping of user names to bcrypt hashes, got {data!r}")
    users = {}
    for user, hashed in data.items():
        if isinstance(user, (bool, dict, list)) or user is None or user == "":
            check.fail("basic_auth_users", f"invalid user name {user!r}")
        key = f"basic_auth_users.{user}"
        if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
            check.fail(key, "not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)")
        users[str(user)] = hashed
    return users


def _parse_rate_limit(check: _Checker, data: dict[str, Any]) -> tuple[float, int]:
    raw = data.get("interval", 0)
    if raw in (0, "0", None):
        interval = 0.0
    elif not isinstance(raw, str) or not re.fullmatch(f"(?:{_DURATION.pattern})+", raw):
        check.fail("rate_limit.interval", f"must be a duration such as 1s or 250ms, got {raw!r}")
    else:
        interval = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION.findall(raw))
    burst = data.get("burst", 0)
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 0:
        check.fail("rate_limit.burst", f"must be an integer >= 0, got {burst!r}")
    if interval > 0 and burst < 1:
        check.fail("rate_limit.burst", "must be >= 1 when rate_limit.interval is set (0 refuses every request)")
    return interval, burst


# -- serving --------------------------------------------------------------------------------------------
class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes, caching successes.

    bcrypt is slow on purpose (~70 ms at cost 10) and Prometheus scrapes every few seconds with the
    same credentials, so a verified (user, password) is remembered under an HMAC with a per-process key:
    the cache holds no password and its lookups leak nothing usable. Unknown users still pay one bcrypt
    check so that timing does not tell which users exist; checks run one at a time, as in the toolkit.
    """

    MAX_CACHED = 256

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = {user: hashed.encode("ascii") for user, hashed in users.items()}
        self._decoy = next(iter(self.users.values()), None)
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        """True when `header` (an Authorization value) names a user and the right password."""
        credentials = _parse_basic(header)
        if credentials is None or self._decoy is None:
            return False
        user, password = credentials
        hashed = self.users.get(user.decode("utf-8", "replace"))
        tag = hmac.new(self._key, b"%d:%s:%s" % (len(user), user, password), hashlib.sha256).digest()
        with self._lock:
            cached = self._cache.get(tag)
        if cached is not None and hashed is not None and hmac.compare_digest(cached, hashed):
            return True
        import bcrypt  # a dependency; imported here so that plain HTTP never needs it
        with self._bcrypt_lock:
            try:
                ok = bcrypt.checkpw(password, hashed if hashed is not None else self._decoy)
            except ValueError:  # e.g. a password over bcrypt's 72 bytes
                ok = False
        if not ok or hashed is None:
            return False
        with self._lock:
            if len(self._cache) >= self.MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[tag] = hashed
        return True


def _parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


class _TokenBucket:
    def __init__(self, interval: float, burst: int) -> None:
        self.rate = 1.0 / interval
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def allow(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False


class WebApp:
    """WSGI middleware for a WebConfig: rate limit (429), response headers, basic auth (401)."""

    def __init__(self, app: Callable, web: WebConfig) -> None:
        self.app = app
        self.headers = list(web.headers.items())
        self.auth = BasicAuth(web.basic_auth_users) if web.basic_auth_users else None
        self.limiter = _TokenBucket(web.rate_limit_interval, web.rate_limit_burst) if web.rate_limit_interval \
            else None

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if self.limiter is not None and not self.limiter.allow():
            return self._plain(start_response, "429 Too Many Requests", [])

        def with_headers(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
            names = {name.lower() for name, _ in self.headers}
            headers = [h for h in headers if h[0].lower() not in names] + self.headers
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        if self.auth is not None and not self.auth.check(environ.get("HTTP_AUTHORIZATION")):
            return self._plain(with_headers, "401 Unauthorized", [("WWW-Authenticate", f'Basic realm="{REALM}"')])
        return self.app(environ, with_headers)

    @staticmethod
    def _plain(start_response: Callable, status: str, headers: list[tuple[str, str]]) -> Iterable[bytes]:
        body = status.split(" ", 1)[1].encode() + b"\n"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                                *headers])
        return [body]

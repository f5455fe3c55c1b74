"""URLs from user data are untrusted: redaction before anything is stored or logged, and the fetch policy
(schemes, private addresses, every redirect). Residual risk: a DNS answer changing after the check.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable

HTTP_SCHEMES = ("http", "https")
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs")
_URL_RE = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]{1,9}://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without credentials, query string or fragment (a short hash of them stands in)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    secret = parts.query + parts.fragment + (parts.netloc if "@" in parts.netloc else "")
    if not secret:
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    tag = hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()[:12]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, f"redacted-{tag}", ""))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted (``redact_url``); other text unchanged."""
    if "://" not in text:
        return text
    return _URL_RE.sub(lambda m: redact_url(m.group(0)), text)


class RedactingFilter(logging.Filter):
    """Redacts URLs in the formatted message of every record (arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's problem, not ours
            return True
        redacted = redact_text(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach ``RedactingFilter`` to every handler of ``logger`` (root by default), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


PROJECT_LOGGERS = ("pipelines", "clipcap_core", "infra", "jobs", "__main__")


def setup_logging(verbose: bool = False) -> None:
    """INFO logging with URL redaction on every handler; ``verbose`` raises only the project's own loggers to
    DEBUG (a DEBUG root logger makes botocore log access-key ids and session tokens)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        for name in PROJECT_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)
    install_log_redaction()


# --- fetch policy ----------------------------------------------------------------------------------------------
def _blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast
            or ip.is_unspecified)


def check_host(host: str, allow_private: bool) -> None:
    """Refuse a host that resolves to any non-public address (unless ``allow_private``)."""
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve host {host!r}: {exc}") from None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if _blocked(ip):
            raise ValueError(f"refusing to fetch from {host!r}: it resolves to a non-public address ({ip}); "
                             "pass --allow-private-urls for trusted internal hosts")


def check_fetch_url(url: str, allow_private: bool = False, allow_object_store: bool = False) -> str:
    """The URL's scheme when the pipeline may fetch it; ValueError naming the reason otherwise."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in OBJECT_STORE_SCHEMES:
        if not allow_object_store:
            raise ValueError(f"{scheme}:// URLs in input data are refused (they would be read with this job's "
                             "own credentials); pass --allow-object-store-urls to fetch them")
        return scheme
    if scheme not in HTTP_SCHEMES:
        raise ValueError(f"URL scheme {scheme or '(none)'!r} not allowed (http, https only)")
    if not parts.hostname:
        raise ValueError("URL has no host")
    if "@" in parts.netloc:  # urllib would put the password into its error messages
        raise ValueError("URL carries credentials (user:password@): refused")
    check_host(parts.hostname, allow_private)
    return scheme


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allow_private: bool):
        self.allow_private = allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        check_fetch_url(newurl, self.allow_private)  # http(s) only, public host: every hop
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_http(url: str, timeout: float, max_bytes: int, allow_private: bool = False) -> bytes:
    """GET ``url`` with the policy above; more than ``max_bytes`` is an error."""
    check_fetch_url(url, allow_private)
    opener = urllib.request.build_opener(_CheckedRedirects(allow_private))
    req = urllib.request.Request(url, headers={"User-Agent": "clipcap-pipeline"})
    with opener.open(req, timeout=timeout) as resp:
        data = resp.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"download larger than {max_bytes} bytes")
    return data


def _literal_private(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return _blocked(ipaddress.ip_address(host))
    except ValueError:
        return False


def url_list_problems(urls: Iterable[str | None], allow_private: bool) -> list[str]:
    """Why a download list must not be fetched (non-http(s) URLs, literal private hosts), one line per
    distinct problem, URLs redacted."""
    problems: dict[str, str] = {}
    hosts: set[str] = set()
    for url in urls:
        if not url:
            continue
        parts = urllib.parse.urlsplit(str(url))
        if parts.scheme.lower() not in HTTP_SCHEMES:
            problems.setdefault(f"scheme {parts.scheme!r}", f"{redact_url(str(url))}: only http(s) URLs are "
                                                           "downloaded (file:// and object-store URLs are refused)")
        elif not allow_private and parts.hostname and parts.hostname not in hosts:
            hosts.add(parts.hostname)
            if _literal_private(parts.hostname):
                problems.setdefault(parts.hostname, f"{parts.hostname}: a private / loopback address; pass "
                                                    "--allow-private-urls for trusted internal hosts")
    return list(problems.values())

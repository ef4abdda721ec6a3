"""Credentials never reach a log, a param, an artifact or a message: one function masks them.

    redact_uri("postgresql://user:secret@db/mlflow")  # -> "postgresql://user:***@db/mlflow"

Every place that logs, prints or renders a config value or a URI (MLflow params and tags, the
``config.yaml`` artifact, the report, the CLI's messages) passes it through :func:`redact_uri` or
:func:`redact`. :func:`split_userinfo` is for code that must *use* such a URI over HTTP: it moves
the credentials from the URL into a basic-auth header.
"""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

# scheme://user:password@ ; the password runs to the last '@' before the path, so '@' may occur in it
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*):(?P<password>[^\s/'\"]+)@")
MASK = "***"


def redact_uri(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", text)


def redact(obj: Any) -> Any:
    """:func:`redact_uri` applied to every string in ``obj`` (nested dicts, lists and tuples; keys kept)."""
    if isinstance(obj, str):
        return redact_uri(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def split_userinfo(url: str) -> tuple[str, dict[str, str]]:
    """``http://u:p@host:5000/x`` -> (``http://host:5000/x``, ``{"Authorization": "Basic ..."}``); urllib
    cannot open a URL with credentials in it, but a server behind basic auth expects them."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, {}
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    token = base64.b64encode(f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()).decode()
    return urlunsplit(parts._replace(netloc=netloc)), {"Authorization": f"Basic {token}"}

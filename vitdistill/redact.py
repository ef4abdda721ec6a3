"""Credentials never reach a log, a param, an artifact or a message: one function masks them.

    redact_uri("postgresql://user:secret@db/mlflow")  # -> "postgresql://user:***@db/mlflow"

Every place that logs, prints or renders a config value or a URI (MLflow params and tags, the
``config.yaml`` artifact, the report, the CLI's messages) passes it through :func:`redact_uri` or
:func:`redact`. :func:`split_userinfo` is for code that must *use* such a URI over HTTP: it moves
the credentials from the URL into a basic-auth header.

A config handed to an orchestrator (Prefect keeps flow-run parameters and deployment defaults in
its database and shows them in its UI) is masked the same way, and the process that runs the flow
puts the passwords back:

    params = {"config": conceal(cfg, persist=True)}   # masked; the passwords go to the secrets file
    cfg = reveal(VitdistillConfig.model_validate(params["config"]))   # in the flow: passwords back

The passwords are kept in this process (for a flow it runs itself) and, with ``persist``, in a JSON
file only its owner can read: ``$VITDISTILL_SECRETS_FILE``, else ``<orchestration.state_dir>/secrets.json``
(``vitdistill up`` points its worker at that file), keyed by the masked URI
(``postgresql://user:***@host``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

# scheme://user:password@ ; the password runs to the last '@' before the path, so '@' may occur in it
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*):(?P<password>[^\s/'\"]+)@")
MASK = "***"
# the same, with the host after the '@': a masked URI names the secret it stands for
_CREDENTIAL = re.compile(_USERINFO.pattern + r"(?P<host>[^\s/'\"?#]*)")
SECRETS_ENV = "VITDISTILL_SECRETS_FILE"
_KEPT: dict[str, str] = {}  # masked URI -> the real one, for flows this process runs itself

log = logging.getLogger(__name__)


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


def _strings(obj: Any):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def credentials(obj: Any) -> dict[str, str]:
    """``{"postgresql://user:***@host": "postgresql://user:secret@host"}`` for every URI with a password in
    the strings of ``obj`` (nested dicts, lists and tuples)."""
    out = {}
    for text in _strings(obj):
        for m in _CREDENTIAL.finditer(text):
            if m.group("password") != MASK:
                out[f"{m.group('head')}:{MASK}@{m.group('host')}"] = m.group(0)
    return out


def unmask(obj: Any, secrets: dict[str, str], missing: list[str] | None = None) -> Any:
    """``obj`` with every masked URI that ``secrets`` holds put back; those it lacks are appended to ``missing``."""
    if isinstance(obj, str):
        def back(m: re.Match) -> str:
            if m.group("password") != MASK:
                return m.group(0)
            if m.group(0) not in secrets and missing is not None:
                missing.append(m.group(0))
            return secrets.get(m.group(0), m.group(0))

        return _CREDENTIAL.sub(back, obj)
    if isinstance(obj, dict):
        return {k: unmask(v, secrets, missing) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unmask(v, secrets, missing) for v in obj)
    return obj


def secrets_file(state_dir: str) -> Path:
    """Where passwords masked out of orchestrator parameters are kept: ``$VITDISTILL_SECRETS_FILE``,
    else ``<state_dir>/secrets.json`` (absolute)."""
    return Path(os.environ.get(SECRETS_ENV) or Path(os.path.abspath(state_dir)) / "secrets.json")


def _read_secrets(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        from vitdistill.errors import ConfigError

        raise ConfigError(f"{path}: cannot read the secrets file ({e}); expected a JSON object written by "
                          "vitdistill deploy / submit") from None
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _write_secrets(path: Path, secrets: dict[str, str]) -> None:
    """Merge ``secrets`` into the file at ``path``, atomically, readable by its owner only (0600)."""
    old = _read_secrets(path)
    kept = {**old, **secrets}
    if kept == old:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".secrets-", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(kept, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def conceal(cfg, persist: bool = False) -> dict:
    """The config as the JSON tree an orchestrator gets: every password in a URI masked (``user:***@``).
    The passwords are kept for :func:`reveal` in this process and, with ``persist`` (a deployment, a
    submitted run: another process runs the flow), in :func:`secrets_file`."""
    tree = cfg.model_dump(mode="json")
    found = credentials(tree)
    _KEPT.update(found)
    if persist and found:
        _write_secrets(secrets_file(cfg.orchestration.state_dir), found)
    return redact(tree)


def reveal(cfg):
    """``cfg`` with the passwords :func:`conceal` masked put back, from this process or the secrets file.
    A masked URI with no password kept anywhere stays masked, with a warning naming it."""
    tree = cfg.model_dump(mode="json")
    if not any(m.group("password") == MASK for t in _strings(tree) for m in _CREDENTIAL.finditer(t)):
        return cfg
    path = secrets_file(cfg.orchestration.state_dir)
    missing: list[str] = []
    tree = unmask(tree, {**_read_secrets(path), **_KEPT}, missing)
    for masked in dict.fromkeys(missing):
        log.warning("config: no password kept for %s (masked before it reached the orchestrator); set %s to the "
                    "secrets file that vitdistill deploy / submit wrote (looked in %s)", masked, SECRETS_ENV, path)
    return type(cfg).model_validate(tree)

"""One masking of secrets for every path out of rungwise: stdout, stderr, MLflow params, tags
and artifacts, the sweep's state file and a job's environment.

``mask_uri`` takes any text (a URI, a libpq DSN, an error message holding either) and
replaces what looks secret with ``MASK``; ``mask_secrets`` does the same for a mapping,
recursively, and also masks every value whose key names a secret. Both are plain regular
expressions, so a URI that ``urllib`` refuses (an unescaped ``#`` or ``/`` in a password, a
broken IPv6 host) is masked all the same, and neither ever raises. When in doubt they mask
too much rather than too little: a masked host name is a nuisance, a leaked password is not.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
MAX_DEPTH = 64

# words that name a secret anywhere in a name ("sslpassword", "X-Amz-Security-Token") ...
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "credential", "signature", "apikey",
                 "api_key", "api-key", "private_key", "private-key", "accesskey", "access_key",
                 "access-key", "sessionid", "session_id")
# ... and ones that only do as a whole part of it ("key", "sig": not "keyword", "design")
_SECRET_PARTS = frozenset({"key", "sig", "auth", "authorization", "jwt", "cookie", "sas"})
_PARTS = re.compile(r"[_\-.\s]+")

# scheme://user:password@ or scheme://user@. The password runs to the last "@" of its
# whitespace-delimited word, so "/", "#", "@" and ":" inside it stay covered.
_USERINFO = re.compile(r"(?P<scheme>(?<![\w+.\-])[A-Za-z][A-Za-z0-9+.\-]*://)"
                       r"(?P<user>[^\s:/?#@]*)(?::(?P<pw>\S*))?@")
# name=value in a query string, a fragment (#access_token=) or a ;-separated string
_QUERY = re.compile(r"(?P<pre>[?&#;])(?P<name>[^=&#;?\s]+)=(?P<val>[^&#;\s]*)")
# name=value in a libpq key/value DSN ("host=db password='a b'") or in plain text
_DSN = re.compile(r"(?P<pre>^|[\s,(])(?P<name>[A-Za-z_][\w.\-]*)(?P<eq>\s*=\s*)"
                  r"(?P<val>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)")
# 'name': 'value' in a printed dict or JSON (an error message quoting its input)
_QUOTED = re.compile(r"(?P<q>['\"])(?P<name>[\w.\-]+)(?P=q)(?P<sep>\s*:\s*)"
                     r"(?P<vq>['\"])(?P<val>(?:\\.|(?!(?P=vq)).)*)(?P=vq)")
# a user name that is a token: known prefixes (GitHub, GitLab, Slack, OpenAI, Hugging Face,
# AWS, Google, npm, PyPI), else long, or letters mixed with digits
_TOKEN_PREFIX = re.compile(r"^(gh[pousr]_|github_pat_|glpat-|xox[abposr]-|sk-|hf_|AKIA|ASIA|"
                           r"ya29\.|npm_|pypi-)")


def is_secret_name(name: str) -> bool:
    """Whether a key or parameter name (``password``, ``X-Amz-Signature``, ``api_key``,
    ``sig``, ``sslpassword`` ...) says its value is a secret; case-insensitive."""
    low = name.lower()
    return any(w in low for w in _SECRET_WORDS) or any(
        p in _SECRET_PARTS for p in _PARTS.split(low))


def looks_like_token(user: str) -> bool:
    """A user name that is a credential (``https://ghp_...@github.com``), not a person's."""
    if _TOKEN_PREFIX.match(user):
        return True
    has_digit = any(c.isdigit() for c in user)
    has_alpha = any(c.isalpha() for c in user)
    return len(user) >= 16 or (len(user) >= 10 and has_digit and has_alpha)


def _userinfo(m: re.Match[str]) -> str:
    user, pw = m["user"], m["pw"]
    shown = MASK if user and looks_like_token(user) else user
    if pw is None:
        return f"{m['scheme']}{shown}@"
    return f"{m['scheme']}{shown}:{MASK if pw else ''}@"


def _mask_query(m: re.Match[str]) -> str:
    if not m["val"] or not is_secret_name(m["name"]):
        return m[0]
    return f"{m['pre']}{m['name']}={MASK}"


def _mask_dsn(m: re.Match[str]) -> str:
    val = m["val"]
    if not is_secret_name(m["name"]) or val in ("''", '""'):
        return m[0]
    quote = val[0] if val[0] in "'\"" else ""  # a quoted value keeps its quotes
    return f"{m['pre']}{m['name']}{m['eq']}{quote}{MASK}{quote}"


def _mask_quoted(m: re.Match[str]) -> str:
    if not m["val"] or not is_secret_name(m["name"]):
        return m[0]
    return f"{m['q']}{m['name']}{m['q']}{m['sep']}{m['vq']}{MASK}{m['vq']}"


def mask_uri(uri: str) -> str:
    """``uri`` (or any text holding URIs or DSNs) with its secrets replaced by ``MASK``:
    passwords and token user names in ``scheme://user:pass@host``, secret query or fragment
    parameters (``?token=``, ``X-Amz-Signature=``, ``sslpassword=`` ...), secret
    ``name=value`` pairs of a DSN and ``'name': 'value'`` pairs of a printed dict.
    Text without secrets comes back unchanged; this never raises."""
    if not isinstance(uri, str):
        return uri
    try:
        text = _USERINFO.sub(_userinfo, uri)
        text = _QUERY.sub(_mask_query, text)
        text = _DSN.sub(_mask_dsn, text)
        return _QUOTED.sub(_mask_quoted, text)
    except Exception:  # never let masking fail a run, and never let a failure leak
        return MASK


def mask_secrets(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with every value under a secret-naming key (the last dotted part decides)
    replaced by ``MASK``, and secrets inside every string masked by ``mask_uri``; dicts and
    lists inside values (``tune.space``) are masked the same way, recursively."""
    return {key: _masked(key, value, 0) for key, value in flat.items()}


def _masked(key: Any, value: Any, depth: int) -> Any:
    if isinstance(key, str) and is_secret_name(key.split(".")[-1]):
        return MASK
    return mask_value(value, depth)


def mask_value(value: Any, depth: int = 0) -> Any:
    """Any value with secrets masked: strings through ``mask_uri``; dicts, lists and tuples
    recursively; numbers and the like as they are."""
    if depth > MAX_DEPTH:
        return MASK
    if isinstance(value, str):
        return mask_uri(value)
    if isinstance(value, dict):
        return {k: _masked(k, v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mask_value(v, depth + 1) for v in value)
    return value

"""One masking of secrets for every path out of rungwise: stdout, stderr, MLflow params, tags
and artifacts, the sweep's state file and a job's environment.

``mask_uri`` takes any text (a URI, a libpq DSN, an error message holding either) and
replaces what looks secret with ``MASK``; ``mask_secrets`` does the same for a mapping,
recursively, and also masks every value whose key names a secret. Neither uses ``urllib``,
so a URI that it refuses (an unescaped ``#`` or ``/`` in a password, a broken IPv6 host) is
masked all the same, and neither ever raises; both take time linear in the text. When in
doubt they mask too much rather than too little: a masked host name is a nuisance, a leaked
password is not.
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
_SCHEME_USER = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)"
                          r"(?P<user>[^\s:/?#@]*)(?P<colon>:?)")
_SPACE = re.compile(r"\s")
# name=value in a query string, a fragment (#access_token=) or a ;-separated string, and in
# a libpq key/value DSN ("host=db password='a b'") or plain text. Only the names are matched:
# a value is read only after a secret name, so no value can hide the pair after it.
_QUERY_NAME = re.compile(r"(?<=[?&#;])(?P<name>[^=&#;?\s]+)=")
_QUERY_VALUE = re.compile(r"[^&#;\s]*")
_DSN_NAME = re.compile(r"(?:^|(?<=[\s,(]))(?P<name>[A-Za-z_][\w.\-]*)\s*=\s*")
_DSN_VALUE = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S*")
# 'name': 'value' in a printed dict or JSON (an error message quoting its input)
_QUOTED_NAME = re.compile(r"(?P<q>['\"])(?P<name>[\w.\-]+)(?P=q)\s*:\s*")
_QUOTED_VALUE = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
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


def _mask_userinfo(text: str) -> str:
    """Passwords, and user names that are tokens, of every ``scheme://user[:password]@``.
    Scanned by hand rather than with a backtracking pattern: linear in the text's length."""
    out, pos, skip = [], 0, 0  # text[:pos] is in out; schemes before skip are done with
    for m in _SCHEME_USER.finditer(text):
        if m.start() < skip:
            continue
        user = m["user"]
        shown = MASK if user and looks_like_token(user) else user
        if not m["colon"]:  # scheme://user@host, or no user at all
            if text.startswith("@", m.end()):
                out += [text[pos:m.start()], m["scheme"], shown, "@"]
                pos = skip = m.end() + 1
            continue
        space = _SPACE.search(text, m.end())
        word_end = space.start() if space else len(text)
        at = text.rfind("@", m.end(), word_end)
        if at < 0:  # no "@" left in this word: no scheme after this one has a user either
            skip = word_end
            continue
        out += [text[pos:m.start()], m["scheme"], shown, ":", MASK if at > m.end() else "", "@"]
        pos = skip = at + 1
    out.append(text[pos:])
    return "".join(out)


def _mask_pairs(text: str, names: re.Pattern[str], value: re.Pattern[str]) -> str:
    """``text`` with the value after every secret ``name=`` masked (quotes kept)."""
    out, pos = [], 0
    for m in names.finditer(text):
        if m.start() < pos or not is_secret_name(m["name"]):
            continue
        v = value.match(text, m.end())
        val = v[0] if v else ""
        if val in ("", "''", '""'):
            continue
        quote = val[0] if len(val) > 1 and val[0] in "'\"" and val[-1] == val[0] else ""
        out += [text[pos:m.end()], quote, MASK, quote]
        pos = v.end() if v else m.end()
    out.append(text[pos:])
    return "".join(out)


def mask_uri(uri: str) -> str:
    """``uri`` (or any text holding URIs or DSNs) with its secrets replaced by ``MASK``:
    passwords and token user names in ``scheme://user:pass@host``, secret query or fragment
    parameters (``?token=``, ``X-Amz-Signature=``, ``sslpassword=`` ...), secret
    ``name=value`` pairs of a DSN and ``'name': 'value'`` pairs of a printed dict.
    Text without secrets comes back unchanged; this never raises."""
    if not isinstance(uri, str):
        return uri
    try:
        text = _mask_userinfo(uri)
        text = _mask_pairs(text, _QUERY_NAME, _QUERY_VALUE)
        text = _mask_pairs(text, _DSN_NAME, _DSN_VALUE)
        return _mask_pairs(text, _QUOTED_NAME, _QUOTED_VALUE)
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
    if isinstance(value, list):
        return [mask_value(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(mask_value(v, depth + 1) for v in value)
    return value

"""Secrets out of everything the project writes: log lines, error messages, manifests, MLflow.

One set of rules, used by the object store (boto3 log filter, error messages), the shard
manifests (producer / extra metadata) and the MLflow tracker (params, tags, dataset sources):

- a *key* is secret when it names a credential (`is_secret_key`): password, passwd, secret,
  credential(s), authorization, cookie, signature, `token` as a word or a word's suffix
  (`api_token`, `authToken`, `hftoken`; not `max_tokens`, `num_tokens`, `tokenizer`), and
  api / access / private key, key id (`aws_access_key_id`, `AccessKeyId`, `s3.key_id`);
- a *URI* keeps its shape (`redact_uri`): the password of `user:password@` becomes `***`
  (`http://user:***@host`); a user without a password, and the whole user info of an s3://
  URI (an access key id and its secret), become `***@host`; the values of query parameters
  that name a credential (`X-Amz-Signature`, `X-Amz-Credential`, `token`, `key`, `sig`) too;
- a *text* (`redact_uris`): every URI in it as above;
- a *log line or error message* (`redact_text`): its URIs as above, `Credential=` and
  security-token header values, strings shaped like an AWS access key id or secret access
  key, and any secret values the caller knows;
- *metadata* (`scrub_mapping`): a copy whose secret keys have their value replaced by `***`
  and whose strings went through `redact_uris` (not `redact_text`: metadata such as prompt
  records must read back as written).

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

MASK = "***"
_UNPARSEABLE = "<unparseable uri>"

# Words of a key (split on separators and camelCase humps) that name a credential.
_SECRET_WORDS = frozenset({
    "secret", "secrets", "password", "passwords", "passwd", "passphrase", "pwd", "credential",
    "credentials", "token", "apikey", "accesskey", "privatekey", "authorization", "cookie",
    "cookies", "signature",
})
# Adjacent words that together name one.
_SECRET_PAIRS = frozenset({("access", "key"), ("key", "id"), ("private", "key"), ("api", "key")})
# Unambiguous even inside a run-together word ("awssecretaccesskey").
_SECRET_SUBSTRINGS = ("secret", "password", "passwd", "credential", "accesskey", "apikey", "privatekey", "keyid")
# Query parameter names that carry a credential although, as config keys, they name none.
_SECRET_QUERY_NAMES = frozenset({"key", "sig"})
# Schemes whose user info is an access key pair (s3://KEY_ID:SECRET@bucket): all of it is masked.
_KEY_PAIR_SCHEMES = frozenset({"s3", "s3a", "s3n"})

_CAMEL_HUMP = re.compile(r"([a-z0-9])([A-Z])")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_HEADER_VALUES = (
    re.compile(r"((?:X-Amz-)?Credential=)[^/\s,'\"&]+", re.I),  # SigV4 scope: the access key id
    re.compile(r"(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,&]+", re.I),  # session token
)
_AWS_ACCESS_KEY_ID = re.compile(
    r"(?<![A-Z0-9])(?:AKIA|ASIA|AIDA|AROA|AIPA|ANPA|ANVA|AGPA|ABIA|ACCA|APKA|A3T[A-Z0-9])[A-Z0-9]{16}(?![A-Z0-9])")
# 40 base64 characters with upper case, lower case and a digit: the shape of a secret access key
# (a 40-character hex digest, all lower case, does not match).
_AWS_SECRET_KEY = re.compile(
    r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]*[A-Z])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[0-9])"
    r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_MIN_SECRET_LEN = 4  # shorter "secrets" would mask random fragments of every line


def _words(name: str) -> list[str]:
    """'storage.AccessKeyId' -> ['storage', 'access', 'key', 'id']."""
    return [w for w in _NOT_ALNUM.split(_CAMEL_HUMP.sub(r"\1 \2", name).lower()) if w]


def is_secret_key(name: str) -> bool:
    """Whether a key (config field, metadata field, file name) names a credential.

    >>> [is_secret_key(k) for k in ("aws_secret_access_key", "api_token", "max_tokens", "tokenizer")]
    [True, True, False, False]
    """
    words = _words(str(name))
    if any(w in _SECRET_WORDS or w.endswith("token") for w in words):
        return True
    if any(pair in _SECRET_PAIRS for pair in zip(words, words[1:])):
        return True
    return any(s in w for w in words for s in _SECRET_SUBSTRINGS)


def is_secret_query_param(name: str) -> bool:
    """Whether a URI query parameter carries a credential (`X-Amz-Signature`, `token`, `key`)."""
    plain = unquote_plus(name)
    return is_secret_key(plain) or plain.lower() in _SECRET_QUERY_NAMES


def _redact_netloc(scheme: str, netloc: str) -> str:
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, _password = userinfo.partition(":")
    if colon and scheme.lower() not in _KEY_PAIR_SCHEMES:
        return f"{user}:{MASK}@{host}"
    return f"{MASK}@{host}"  # a bare user may be a token (https://<token>@host), s3 user info a key pair


def _redact_query(query: str) -> str:
    items = []
    for item in query.split("&"):
        name, eq, _value = item.partition("=")
        items.append(f"{name}={MASK}" if eq and is_secret_query_param(name) else item)
    return "&".join(items)


def redact_uri(uri: str) -> str:
    """The URI with its credentials masked, else unchanged (the same string).

    >>> redact_uri("http://minio:pw@host:9000/x?X-Amz-Signature=abc&part=1")
    'http://minio:***@host:9000/x?X-Amz-Signature=***&part=1'
    >>> redact_uri("s3://AKID:secret@bucket/a")
    's3://***@bucket/a'
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return _UNPARSEABLE
    netloc = _redact_netloc(parts.scheme, parts.netloc)
    query = _redact_query(parts.query) if parts.query else parts.query
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without its user info, user, password), user info percent-decoded; a URI
    without user info comes back unchanged with (None, None).

    >>> split_credentials("http://ml:p%40ss@host:5000/x")
    ('http://host:5000/x', 'ml', 'p@ss')
    """
    parts = urlsplit(uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return uri, None, None
    user, colon, password = userinfo.partition(":")
    plain = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return plain, unquote(user) if user else None, unquote(password) if colon else None


def redact_uris(text: str) -> str:
    """`text` with the credentials of every URI in it masked (`redact_uri`), else unchanged.

    >>> redact_uris("cannot reach http://minio:pw@127.0.0.1:9000 (timeout)")
    'cannot reach http://minio:***@127.0.0.1:9000 (timeout)'
    """
    return _URI_IN_TEXT.sub(lambda m: _redact_uri_in_text(m.group(0)), str(text))


def redact_text(text: str, secrets: Iterable[str | None] = ()) -> str:
    """A log line or error message with every credential in it masked.

    Masks, in order: the given secret values (at least 4 characters long), the credentials of
    every URI in the text (`redact_uris`), SigV4 `Credential=` and `x-amz-security-token`
    values, and strings shaped like AWS access key ids (`AKIA` + 16) or secret access keys
    (40 base64 characters).
    """
    text = str(text)
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET_LEN and secret in text:
            text = text.replace(secret, MASK)
    text = redact_uris(text)
    for pattern in _HEADER_VALUES:
        text = pattern.sub(rf"\1{MASK}", text)
    text = _AWS_ACCESS_KEY_ID.sub(MASK, text)
    return _AWS_SECRET_KEY.sub(MASK, text)


def _redact_uri_in_text(uri: str) -> str:
    redacted = redact_uri(uri)
    if redacted != _UNPARSEABLE:
        return redacted
    return MASK if "@" in uri else uri  # cannot tell its user info apart: all of it, if it may have one


def scrub_mapping(value: Any) -> Any:
    """A copy of nested metadata (mappings, lists, scalars) that is safe to share.

    Values under a secret key become '***'; strings go through `redact_uris`; mappings come back
    as dicts and tuples as lists (JSON's shapes).

    >>> scrub_mapping({"max_tokens": 77, "hf_token": "x", "ckpt": "s3://K:S@b/c"})
    {'max_tokens': 77, 'hf_token': '***', 'ckpt': 's3://***@b/c'}
    """
    if isinstance(value, Mapping):
        return {k: MASK if is_secret_key(str(k)) else scrub_mapping(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_mapping(v) for v in value]
    if isinstance(value, str):
        return redact_uris(value)
    return value


def secret_key_paths(value: Any, path: str = "") -> list[str]:
    """Dotted paths of the keys in nested metadata that `scrub_mapping` masks (for warnings).

    >>> secret_key_paths({"a": {"password": 1}, "b": [{"api_key": 2}]}, "producer")
    ['producer.a.password', 'producer.b[0].api_key']
    """
    found: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            found += [sub] if is_secret_key(str(k)) else secret_key_paths(v, sub)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += secret_key_paths(v, f"{path}[{i}]")
    return found


def credential_paths(value: Any, path: str = "", skip: Callable[[str], bool] = lambda p: False) -> list[str]:
    """Dotted paths in nested settings that hold a credential: a non-empty value under a secret
    key, or a string with a URI that carries one (user:password@, a signed query). `skip(path)`
    leaves out the paths whose credentials the caller moves elsewhere.

    >>> credential_paths({"a": {"api_key": "k", "token": ""}, "u": "http://u:p@h/", "n": 3})
    ['a.api_key', 'u']
    """
    found: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if skip(sub):
                continue
            if is_secret_key(str(k)):
                found += [sub] if v not in (None, "", [], {}) else []
            else:
                found += credential_paths(v, sub, skip)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += credential_paths(v, f"{path}[{i}]", skip)
    elif isinstance(value, str) and redact_uris(value) != value:
        found.append(path)
    return found

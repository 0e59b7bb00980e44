"""Bearer tokens and roles of the admin API: making, hashing and checking tokens, in memory.

Roles nest: viewer ⊂ operator ⊂ admin. A token is `extreg_` plus `secrets.token_urlsafe(32)`
(256 random bits) and only its SHA-256 hex digest is ever stored. A fast, unsalted hash is the
right tool here and a password hash (bcrypt, argon2) is not: slow salted hashes exist to make
guessing *low-entropy* secrets expensive, but nobody can enumerate 2**256 candidates however
fast the hash is, and a fast hash lets every request be checked in microseconds.

`TokenBook` holds the known tokens in memory (filled from the database by `extreg.tokens` and
from an optional tokens file), so checking a request does no I/O. `check` compares the
presented token's digest with every stored digest using `hmac.compare_digest` and without
stopping at a match, so its timing says nothing about which digest, if any, matched.
`SessionBook` keeps the dashboard's browser sessions, in memory too (see there).

The tokens file (setting `api_tokens_file`, for registries running on fixtures without a
database) is TOML or JSON mapping each name to its role and digest. `extreg token create NAME
--role R --file FILE` adds an entry to a JSON one; a TOML one is written by hand:

    [tokens.ci]                       # JSON: {"tokens": {"ci": {"role": ..., "sha256": ...}}}
    role = "operator"
    sha256 = "<64 hex digits>"
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")  # in order of power
TOKEN_PREFIX = "extreg_"
TOKEN_BYTES = 32
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def role_allows(held: str, needed: Role) -> bool:
    """Whether a token of role `held` may do what needs `needed` (roles nest)."""
    return held in ROLES and ROLES.index(held) >= ROLES.index(needed)


def generate_token() -> str:
    """A new secret token; show it once and keep only `hash_token(token)`."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The SHA-256 hex digest stored for a token (see the module docstring for why SHA-256)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    """`name` if it is a valid token name, else `ConfigError` saying what a name may be."""
    if not NAME_PATTERN.match(name):
        raise ConfigError(
            f"token name {name!r} is invalid: use 1-64 characters of a-z A-Z 0-9 _ . @ : -, "
            "starting with a letter or digit"
        )
    return name


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is invalid: use one of {', '.join(ROLES)}")
    return role


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the token's name (the audit log's `changed_by`) and its role."""

    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class TokenEntry:
    name: str
    role: Role
    digest: bytes  # the raw 32-byte SHA-256 digest


class TokenBook:
    """The tokens a server accepts, in memory, merged from named sources ("database", "file").

    Sources are replaced whole (`replace`), so a reader never sees half a refresh. When two
    sources name the same token, the later-added source wins.
    """

    def __init__(self) -> None:
        self._sources: dict[str, dict[str, TokenEntry]] = {}
        self._entries: tuple[TokenEntry, ...] = ()

    def replace(self, source: str, entries: Iterable[TokenEntry]) -> None:
        self._sources[source] = {e.name: e for e in entries}
        merged: dict[str, TokenEntry] = {}
        for found in self._sources.values():
            merged.update(found)
        self._entries = tuple(merged.values())

    def add(self, name: str, role: Role, token: str, source: str = "memory") -> None:
        """Accept one more token (tests and embedding programs)."""
        entries = [*self._sources.get(source, {}).values(), entry(name, role, hash_token(token))]
        self.replace(source, entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, token: str) -> Principal | None:
        """The principal a presented token stands for, or None; constant time per entry."""
        return self.holder(hashlib.sha256(token.encode("utf-8", "replace")).digest())

    def holder(self, digest: bytes) -> Principal | None:
        """The principal of the token with this SHA-256 digest while the book holds it (a
        session re-checks its token this way at every request, so a revoke ends it)."""
        found: TokenEntry | None = None
        for candidate in self._entries:  # no early exit: timing does not reveal the match
            if hmac.compare_digest(digest, candidate.digest):
                found = candidate
        return Principal(found.name, found.role) if found else None


def entry(name: str, role: str, hex_digest: str) -> TokenEntry:
    """A `TokenEntry` from stored values; `ConfigError` when one of them is malformed."""
    if not _DIGEST.match(hex_digest):
        raise ConfigError(f"token {name!r}: sha256 must be 64 lower-case hex digits")
    return TokenEntry(check_name(name), check_role(role), bytes.fromhex(hex_digest))


def load_tokens_file(path: Path) -> list[TokenEntry]:
    """The tokens of a TOML or JSON tokens file (format in the module docstring)."""
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"tokens file {path}: cannot read it: {exc.strerror}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"tokens file {path}: not valid {path.suffix or 'TOML'}: {exc}") from None
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, Mapping):
        raise ConfigError(f"tokens file {path}: expected a 'tokens' table of name -> role, sha256")
    found = []
    for name, values in tokens.items():
        if not isinstance(values, Mapping) or set(values) != {"role", "sha256"}:
            raise ConfigError(f"tokens file {path}: token {name!r} needs exactly role and sha256")
        try:
            found.append(entry(str(name), str(values["role"]), str(values["sha256"])))
        except ConfigError as exc:
            raise ConfigError(f"tokens file {path}: {exc}") from None
    return found


def add_to_tokens_file(path: Path, name: str, role: Role, hex_digest: str) -> None:
    """Add (or replace) one token in a JSON tokens file, creating the file if needed."""
    if path.suffix != ".json":
        raise ConfigError(f"tokens file {path}: only .json files are written; edit TOML by hand")
    data: dict[str, Any] = {"tokens": {}}
    if path.exists():
        load_tokens_file(path)  # refuse to rewrite a file we could not read back
        data = json.loads(path.read_text(encoding="utf-8"))
    data["tokens"][check_name(name)] = {"role": check_role(role), "sha256": hex_digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    partial.chmod(0o600)
    partial.replace(path)


SESSION_TTL_S = 12 * 3600.0  # a browser session's lifetime: a working day, then sign in again


@dataclass(frozen=True, slots=True)
class Session:
    """One signed-in browser: its token's digest (never the token), its CSRF token, its end."""

    digest: bytes
    csrf: str
    expires: float  # on the book's clock


class SessionBook:
    """The dashboard's browser sessions, in the memory of the serving process.

    The session cookie carries a random id (`secrets.token_urlsafe`, 256 bits) and nothing
    derived from the token, so a stolen cookie ends with its session and never yields the
    token. A session maps to its token's digest, a per-session CSRF token and an expiry;
    every use looks the digest up in the `TokenBook` again, so revoking the token (the token
    follower drops it from the book) ends its sessions at once, and a new token of the same
    name does not revive them. Sessions die with the process (signing in again is cheap) and
    are kept by the SHA-256 of their id, so even the dict holds no usable cookie. Memory is
    bounded: ended sessions are swept at each sign-in, and at most `max_sessions` are kept,
    the oldest dropped first.
    """

    def __init__(
        self,
        tokens: TokenBook,
        ttl_s: float = SESSION_TTL_S,
        *,
        max_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens = tokens
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, token: str) -> tuple[str, Session] | None:
        """A new session for a valid `token`: (session id for the cookie, session); or None."""
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        if self.tokens.holder(digest) is None:
            return None
        self._sweep()
        while len(self._sessions) >= self.max_sessions:
            del self._sessions[min(self._sessions, key=lambda k: self._sessions[k].expires)]
        session_id = secrets.token_urlsafe(32)
        session = Session(digest, secrets.token_urlsafe(32), self._clock() + self.ttl_s)
        self._sessions[_key(session_id)] = session
        return session_id, session

    def find(self, session_id: str) -> tuple[Session, Principal] | None:
        """The live session of a cookie and who it stands for; None (and the session is
        forgotten) when it is unknown, expired, or its token no longer works."""
        key = _key(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        principal = self.tokens.holder(session.digest) if session.expires > self._clock() else None
        if principal is None:
            del self._sessions[key]
        return (session, principal) if principal else None

    def close(self, session_id: str) -> None:
        self._sessions.pop(_key(session_id), None)

    def _sweep(self) -> None:
        now = self._clock()
        for key, session in list(self._sessions.items()):
            if session.expires <= now or self.tokens.holder(session.digest) is None:
                del self._sessions[key]


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()

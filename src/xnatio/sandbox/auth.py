"""Authentication as XNAT does it: HTTP Basic, JSESSIONID cookies with idle timeout, alias tokens.

- Basic on any request; a failure is 401 with
  ``WWW-Authenticate: Basic realm="XNAT Protected Area"``.
- ``/data/JSESSION`` hands out the session id (32 hex chars); a Basic-authenticated request without
  a valid cookie also gets a fresh ``Set-Cookie: JSESSIONID`` (Tomcat does this), and a valid Basic
  header wins over an expired cookie, so only cookie-only clients see 401 when a session expires.
- At most ``MAX_SESSIONS_PER_USER`` sessions per account; older ones are evicted, as XNAT does.
- Alias tokens (``/data/services/tokens/issue``) work as Basic ``alias:secret`` for 48 hours.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from xnatio.sandbox.pages import HttpError

REALM = 'Basic realm="XNAT Protected Area"'
MAX_SESSIONS_PER_USER = 1000
TOKEN_LIFETIME = 48 * 3600.0


@dataclass
class Token:
    alias: str
    secret: str
    user: str
    expires: float


@dataclass
class Principal:
    """Who a request is, and whether the handler should send a new JSESSIONID cookie."""

    user: str
    new_session: str | None = None


def unauthorized(message: str = "Authentication required") -> HttpError:
    return HttpError(401, message, {"WWW-Authenticate": REALM})


class Authenticator:
    def __init__(self, users: dict[str, str], session_timeout: float) -> None:
        self._users = dict(users)
        self._lock = threading.Lock()
        self.session_timeout = session_timeout
        # session id -> (user, last seen); ordered by creation for per-user eviction.
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._tokens: dict[str, Token] = {}

    # -- credentials -----------------------------------------------------------------------
    def _check_password(self, user: str, password: str) -> str | None:
        expected = self._users.get(user)
        if expected is not None and hmac.compare_digest(expected, password):
            return user
        with self._lock:
            token = self._tokens.get(user)
        if (
            token is not None
            and token.expires > time.time()
            and hmac.compare_digest(token.secret, password)
        ):
            return token.user
        return None

    def login(self, user: str, password: str) -> str | None:
        """The login a user name/password (or alias/secret) pair stands for, else None."""
        return self._check_password(user, password)

    def authenticate(self, authorization: str | None, cookie_session: str | None) -> Principal:
        """Resolve a request's identity; raises 401 ``HttpError`` when it has none."""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise unauthorized()
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise unauthorized() from None
            login = self._check_password(user, password)
            if login is None:
                raise unauthorized("Login attempt failed. Please try again.")
            if cookie_session and self.touch(cookie_session) == login:
                return Principal(login)
            return Principal(login, new_session=self.new_session(login))
        if cookie_session:
            login = self.touch(cookie_session)
            if login is not None:
                return Principal(login)
            raise unauthorized("Your session has expired or is invalid; please log in again.")
        raise unauthorized()

    # -- sessions --------------------------------------------------------------------------
    def new_session(self, user: str) -> str:
        sid = secrets.token_hex(16).upper()
        now = time.monotonic()
        with self._lock:
            self._sessions[sid] = (user, now)
            mine = [s for s, (u, _) in self._sessions.items() if u == user]
            for old in mine[: max(0, len(mine) - MAX_SESSIONS_PER_USER)]:
                del self._sessions[old]
        return sid

    def touch(self, sid: str) -> str | None:
        """The user of a live session (refreshing its idle clock), or None if gone/expired."""
        now = time.monotonic()
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is None:
                return None
            user, last = entry
            if now - last > self.session_timeout:
                del self._sessions[sid]
                return None
            self._sessions[sid] = (user, now)
            return user

    def end_session(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(sid, None)

    def expire_all(self) -> None:
        with self._lock:
            self._sessions.clear()

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- alias tokens ----------------------------------------------------------------------
    def issue_token(self, user: str) -> Token:
        token = Token(
            alias=str(uuid.uuid4()),
            secret=secrets.token_urlsafe(48),
            user=user,
            expires=time.time() + TOKEN_LIFETIME,
        )
        with self._lock:
            self._tokens[token.alias] = token
        return token

    def invalidate_token(self, alias: str) -> bool:
        with self._lock:
            return self._tokens.pop(alias, None) is not None

    def get_token(self, alias: str) -> Token | None:
        with self._lock:
            return self._tokens.get(alias)

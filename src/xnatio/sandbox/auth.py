"""Authentication as XNAT does it (facts 2): HTTP Basic, JSESSIONID cookies with idle timeout,
alias tokens, the per-user session cap, the lockout after failed logins, and CSRF.

- No or bad credentials: 401 with ``WWW-Authenticate: Basic realm="XNAT"`` (the site ID;
  XnatAuthenticationEntryPoint.java:66-71, SCP:105-106). A browser-like User-Agent without
  credentials is redirected to the login page instead (302).
- Every Basic-authenticated request without a valid session cookie opens a new HTTP session
  (XnatBasicAuthenticationFilter.java:84-101) and gets ``Set-Cookie: JSESSIONID``; a valid Basic
  header wins over an expired cookie, so only cookie-only clients see 401 when a session expires.
- At most ``max_sessions`` (XNAT: 1000) live sessions per user, with
  ``maxSessionsPreventsLogin(true)``: a further login is refused with 401 and the old sessions
  are kept (SecurityConfig.java:170-180, 298-304). Idle sessions expire (``session_timeout``).
- ``max_failed_logins`` (XNAT: 20) failed logins in a row lock the account for
  ``lockout_seconds`` (XNAT: 1 h); a locked account gets 401 even with the right password
  (SCP:1573-1587, 1690-1691). A successful login resets the count.
- CSRF: POST/PUT/DELETE from a browser-like User-Agent must carry the session's ``XNAT_CSRF``
  token, even with Basic auth; blank, ``XNATDesktopClient``, ``…JAVA…`` and non-browser agents are
  exempt (SecureAction.isCsrfTokenOk, non-strict). XnatSecureGuard wraps the refusal
  (InvalidCsrfException) in a RuntimeException, so the client sees Restlet's **500** (read in
  NrgXnat/xnat-web ``restlet/guard/XnatSecureGuard.java`` ``authenticate``). A Basic-only client
  opens a new session, with a new token, on every request, so it can never pass: as on XNAT.
- ``/data/JSESSION`` hands out the session id; alias tokens (``/data/services/tokens/issue``) work
  as Basic ``alias:secret`` for 48 hours.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from xnatio.sandbox.pages import HttpError

SITE_ID = "XNAT"
REALM = f'Basic realm="{SITE_ID}"'
MAX_SESSIONS_PER_USER = 1000  # SCP:1039-1040
MAX_FAILED_LOGINS = 20  # SCP:1573-1587
LOCKOUT_SECONDS = 3600.0  # SCP:1690-1691
TOKEN_LIFETIME = 48 * 3600.0
MSG_MAX_SESSIONS = "Maximum sessions of {n} for this principal exceeded"
MSG_LOCKED = "User account is locked"

# A browser as UserAgentUtils sees one (WEB_BROWSER/MOBILE_BROWSER): the agents all browsers send
# start with "Mozilla/" (or "Opera"); scripts (python-requests, curl, Java) do not.
_BROWSER = re.compile(r"^(Mozilla/|Opera)")


def is_browser(user_agent: str | None) -> bool:
    """Whether XNAT treats the agent as a browser for CSRF (SecureAction.isCsrfTokenOk)."""
    ua = (user_agent or "").strip()
    if not ua or "XNATDesktopClient" in ua or "JAVA" in ua.upper():
        return False
    return bool(_BROWSER.match(ua))


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
    session: str | None = None  # the JSESSION this request runs in (new or from the cookie)


def unauthorized(message: str = "Authentication required") -> HttpError:
    return HttpError(401, message, {"WWW-Authenticate": REALM})


class Authenticator:
    """``check_password(user, password) -> bool`` is the user store (``access.Access``)."""

    def __init__(
        self,
        check_password: Callable[[str, str], bool],
        session_timeout: float,
        *,
        max_sessions: int = MAX_SESSIONS_PER_USER,
        max_failed_logins: int = MAX_FAILED_LOGINS,
        lockout_seconds: float = LOCKOUT_SECONDS,
    ) -> None:
        self._check = check_password
        self._lock = threading.Lock()
        self.session_timeout = session_timeout
        self.max_sessions = max_sessions
        self.max_failed_logins = max_failed_logins
        self.lockout_seconds = lockout_seconds
        # session id -> (user, last seen, CSRF token); ordered by creation.
        self._sessions: OrderedDict[str, tuple[str, float, str]] = OrderedDict()
        self._tokens: dict[str, Token] = {}
        self._failures: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}

    # -- credentials -----------------------------------------------------------------------
    def _check_password(self, user: str, password: str) -> str | None:
        if self._check(user, password):
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
        """The login a user name/password (or alias/secret) pair stands for, else None; counts
        failures towards the lockout and refuses a locked account."""
        now = time.monotonic()
        with self._lock:
            if self._locked_until.get(user, 0.0) > now:
                return None
        login = self._check_password(user, password)
        with self._lock:
            if login is None:
                failures = self._failures.get(user, 0) + 1
                self._failures[user] = failures
                if failures >= self.max_failed_logins:
                    self._locked_until[user] = now + self.lockout_seconds
                    self._failures.pop(user, None)
                return None
            self._failures.pop(user, None)
            if self._locked_until.get(login, 0.0) > now:
                return None
        return login

    def is_locked(self, user: str) -> bool:
        with self._lock:
            return self._locked_until.get(user, 0.0) > time.monotonic()

    def unlock(self, user: str) -> None:
        with self._lock:
            self._locked_until.pop(user, None)
            self._failures.pop(user, None)

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
            login = self.login(user, password)
            if login is None:
                if self.is_locked(user):
                    raise unauthorized(MSG_LOCKED)
                raise unauthorized("Login attempt failed. Please try again.")
            if cookie_session and self.touch(cookie_session) == login:
                return Principal(login, session=cookie_session)
            sid = self.new_session(login)
            return Principal(login, new_session=sid, session=sid)
        if cookie_session:
            login = self.touch(cookie_session)
            if login is not None:
                return Principal(login, session=cookie_session)
            raise unauthorized("Your session has expired or is invalid; please log in again.")
        raise unauthorized()

    # -- sessions --------------------------------------------------------------------------
    def new_session(self, user: str) -> str:
        """Open a session; 401 when the user holds ``max_sessions`` live ones already (XNAT
        refuses the login and keeps the old sessions)."""
        sid = secrets.token_hex(16).upper()
        now = time.monotonic()
        with self._lock:
            self._expire_idle(now)
            mine = sum(1 for u, _, _ in self._sessions.values() if u == user)
            if mine >= self.max_sessions:
                raise unauthorized(MSG_MAX_SESSIONS.format(n=self.max_sessions))
            self._sessions[sid] = (user, now, secrets.token_hex(16))
        return sid

    def _expire_idle(self, now: float) -> None:
        dead = [
            s for s, (_, last, _) in self._sessions.items() if now - last > self.session_timeout
        ]
        for sid in dead:
            del self._sessions[sid]

    def touch(self, sid: str) -> str | None:
        """The user of a live session (refreshing its idle clock), or None if gone/expired."""
        now = time.monotonic()
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is None:
                return None
            user, last, csrf = entry
            if now - last > self.session_timeout:
                del self._sessions[sid]
                return None
            self._sessions[sid] = (user, now, csrf)
            return user

    def csrf_token(self, sid: str | None) -> str | None:
        with self._lock:
            entry = self._sessions.get(sid or "")
            return entry[2] if entry else None

    def end_session(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(sid, None)

    def expire_all(self) -> None:
        with self._lock:
            self._sessions.clear()

    def session_count(self, user: str | None = None) -> int:
        with self._lock:
            return sum(1 for u, _, _ in self._sessions.values() if user is None or u == user)

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

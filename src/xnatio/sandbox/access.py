"""Projects, users and project roles, as XNAT has them, kept in the sandbox's SQLite index.

What XNAT does and the sandbox follows (facts = ``shared/xnat-api.md``):

- A project exists once created (``PUT /data/projects/ID`` by a site admin, or named when the
  sandbox starts). It has an ID, a secondary ID, aliases, an accessibility (``private``,
  ``protected``, ``public``) and a prearchive code (facts 3.5: ``0`` prearchive, ``4``
  auto-archive, ``5`` auto-archive + file overwrite). ``Unassigned`` is not a project.
- A project is found by ID or alias; the canonical ID is used from then on (facts 3.5, UPC:246-281).
- Project roles are the groups ``Owners``, ``Members`` and ``Collaborators``
  (``ProjectMemberResource``). Owners and members create and edit data; only owners delete and
  manage users; collaborators read only. Site admins may do everything (facts 1.2,
  ``Permissions.java``; XNAT wiki "Understanding User Roles and Permissions", its CRUD table).
- A public project's data is readable by every user. The wiki says public gives "Member
  permissions" to all users, CNDA's guide says "Collaborator permissions"; the sandbox takes the
  one hardest on a client: read only, so a client never assumes it may write there.
- **Read** (facts 1.2): a member/owner/collaborator, a site admin, or any user for a non-private
  project. That is what the importer checks (unreadable → Unassigned) and what ``GET
  /data/projects/P`` answers 200 to (facts 2). The *data* of a protected project (subjects,
  experiments, files) is readable only to its members and admins (XNAT: "protected" shows the
  project, not its data); ``can_read_data`` is that check.
- A user is a login with a password; a site admin flag; no access to anything until given a role
  (``--add-user``).

Everything lives in three tables of ``index.sqlite`` (the catalog's connection and lock), so it
survives a restart. Passwords are stored salted and hashed (SHA-256: the sandbox checks a Basic
header on every request, and it is a test server).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass

UNASSIGNED = "Unassigned"

ROLES = ("owner", "member", "collaborator")
# The group names of ProjectUserResource's URL (…/users/{Owners|Members|Collaborators}/NAME).
GROUPS = {"owners": "owner", "members": "member", "collaborators": "collaborator"}
ACCESSIBILITY = ("private", "protected", "public")
PREARCHIVE_CODES = (0, 4, 5)  # facts 3.5 (PrearchiveCode.java:19-21)

# XNAT project IDs: letters, digits, "_" and "-" (XNAT's project form refuses anything else).
_PROJECT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    id TEXT PRIMARY KEY, secondary_id TEXT NOT NULL, name TEXT NOT NULL,
    accessibility TEXT NOT NULL DEFAULT 'private', prearchive_code INTEGER NOT NULL DEFAULT 0,
    description TEXT NOT NULL DEFAULT '', created TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS project_aliases (alias TEXT PRIMARY KEY, project TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    login TEXT PRIMARY KEY, salt TEXT NOT NULL, hash TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0, enabled INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS project_users (
    project TEXT NOT NULL, login TEXT NOT NULL, role TEXT NOT NULL,
    PRIMARY KEY (project, login));
"""


@dataclass(frozen=True)
class Project:
    id: str
    secondary_id: str
    name: str
    accessibility: str
    prearchive_code: int
    description: str
    aliases: tuple[str, ...]


def valid_project_id(value: str) -> bool:
    return bool(_PROJECT_ID.match(value)) and value != UNASSIGNED


def _hash(salt: str, password: str) -> str:
    return hashlib.sha256((salt + "\0" + password).encode()).hexdigest()


class Access:
    """Projects, users and roles in the shared SQLite connection. Thread-safe."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock
        with self._lock:
            self._db.executescript(SCHEMA)

    def _q(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.execute(sql, args)
            cur.row_factory = sqlite3.Row
            return cur.fetchall()

    def _x(self, sql: str, args: tuple[object, ...] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # -- projects ----------------------------------------------------------------------------
    def canonical_project(self, project_or_alias: str) -> str | None:
        """The project's ID, given its ID or one of its aliases; None: no such project."""
        if not project_or_alias:
            return None
        rows = self._q("SELECT id FROM projects WHERE id=?", (project_or_alias,))
        if rows:
            return str(rows[0]["id"])
        rows = self._q("SELECT project FROM project_aliases WHERE alias=?", (project_or_alias,))
        return str(rows[0]["project"]) if rows else None

    def project(self, project_or_alias: str) -> Project | None:
        pid = self.canonical_project(project_or_alias)
        if pid is None:
            return None
        rows = self._q("SELECT * FROM projects WHERE id=?", (pid,))
        if not rows:
            return None
        r = rows[0]
        aliases = self._q("SELECT alias FROM project_aliases WHERE project=? ORDER BY 1", (pid,))
        return Project(
            id=r["id"],
            secondary_id=r["secondary_id"],
            name=r["name"],
            accessibility=r["accessibility"],
            prearchive_code=int(r["prearchive_code"]),
            description=r["description"],
            aliases=tuple(a["alias"] for a in aliases),
        )

    def projects(self) -> list[Project]:
        ids = [r["id"] for r in self._q("SELECT id FROM projects ORDER BY id")]
        return [p for p in (self.project(i) for i in ids) if p is not None]

    def create_project(
        self,
        project_id: str,
        *,
        secondary_id: str | None = None,
        name: str | None = None,
        accessibility: str = "private",
        prearchive_code: int = 0,
        description: str = "",
        aliases: tuple[str, ...] = (),
        owner: str | None = None,
    ) -> bool:
        """Create a project (True) or leave an existing one as it is (False).

        Raises ValueError for an invalid ID, accessibility or prearchive code, or an alias
        that names another project.
        """
        if not valid_project_id(project_id):
            raise ValueError(f"Invalid project ID: {project_id!r}")
        if accessibility not in ACCESSIBILITY:
            raise ValueError(f"Invalid accessibility: {accessibility!r}")
        if prearchive_code not in PREARCHIVE_CODES:
            raise ValueError(f"Invalid prearchive code: {prearchive_code!r}")
        with self._lock:
            other = self.canonical_project(project_id)
            if other is not None:
                if other != project_id:
                    raise ValueError(f"{project_id} is already an alias of project {other}")
                return False
            for alias in aliases:
                taken = self.canonical_project(alias)
                if taken is not None or not valid_project_id(alias):
                    raise ValueError(f"Invalid or taken project alias: {alias!r}")
            self._x(
                "INSERT INTO projects (id, secondary_id, name, accessibility, prearchive_code,"
                " description, created) VALUES (?,?,?,?,?,?,datetime('now'))",
                (
                    project_id,
                    secondary_id or project_id,
                    name or secondary_id or project_id,
                    accessibility,
                    prearchive_code,
                    description,
                ),
            )
            for alias in aliases:
                self._x("INSERT INTO project_aliases VALUES (?,?)", (alias, project_id))
            if owner is not None and self.user_exists(owner):
                self.set_role(project_id, owner, "owner")
            return True

    def update_project(
        self,
        project: str,
        *,
        secondary_id: str | None = None,
        accessibility: str | None = None,
    ) -> None:
        pid = self._require(project)
        if accessibility is not None:
            if accessibility not in ACCESSIBILITY:
                raise ValueError(f"Invalid accessibility: {accessibility!r}")
            self._x("UPDATE projects SET accessibility=? WHERE id=?", (accessibility, pid))
        if secondary_id:
            self._x("UPDATE projects SET secondary_id=? WHERE id=?", (secondary_id, pid))

    def delete_project(self, project: str) -> None:
        pid = self._require(project)
        with self._lock:
            self._x("DELETE FROM project_users WHERE project=?", (pid,))
            self._x("DELETE FROM project_aliases WHERE project=?", (pid,))
            self._x("DELETE FROM projects WHERE id=?", (pid,))

    def _require(self, project: str) -> str:
        pid = self.canonical_project(project)
        if pid is None:
            raise KeyError(project)
        return pid

    def prearchive_code(self, project: str) -> int:
        """Facts 3.5: 0 (prearchive), 4 (auto-archive) or 5 (auto-archive, overwrite files);
        0 for anything that is not a project (``Unassigned`` never auto-archives)."""
        pid = self.canonical_project(project)
        if pid is None:
            return 0
        rows = self._q("SELECT prearchive_code FROM projects WHERE id=?", (pid,))
        return int(rows[0]["prearchive_code"]) if rows else 0

    def set_prearchive_code(self, project: str, code: int) -> None:
        if code not in PREARCHIVE_CODES:
            raise ValueError(f"Invalid prearchive code: {code!r}")
        pid = self._require(project)
        self._x("UPDATE projects SET prearchive_code=? WHERE id=?", (code, pid))

    # -- users -------------------------------------------------------------------------------
    def add_user(self, login: str, password: str, *, admin: bool = False) -> None:
        """Create a user, or set the password (and raise to admin if asked) of an existing one."""
        if not login or ":" in login:
            raise ValueError(f"Invalid user name: {login!r}")
        salt = secrets.token_hex(8)
        with self._lock:
            if self.user_exists(login):
                self._x(
                    "UPDATE users SET salt=?, hash=?, admin=MAX(admin, ?) WHERE login=?",
                    (salt, _hash(salt, password), int(admin), login),
                )
            else:
                self._x(
                    "INSERT INTO users (login, salt, hash, admin) VALUES (?,?,?,?)",
                    (login, salt, _hash(salt, password), int(admin)),
                )

    def user_exists(self, login: str) -> bool:
        return bool(self._q("SELECT 1 FROM users WHERE login=?", (login,)))

    def users(self) -> list[str]:
        return [r["login"] for r in self._q("SELECT login FROM users ORDER BY login")]

    def check_password(self, login: str, password: str) -> bool:
        rows = self._q("SELECT salt, hash, enabled FROM users WHERE login=?", (login,))
        if not rows or not rows[0]["enabled"]:
            return False
        return hmac.compare_digest(rows[0]["hash"], _hash(rows[0]["salt"], password))

    def is_admin(self, user: str) -> bool:
        rows = self._q("SELECT admin FROM users WHERE login=?", (user,))
        return bool(rows and rows[0]["admin"])

    # -- roles -------------------------------------------------------------------------------
    def set_role(self, project: str, user: str, role: str) -> None:
        """Give ``user`` one role in ``project`` (replacing any other role, as XNAT moves a user
        between a project's groups). Raises KeyError for an unknown project or user."""
        if role not in ROLES:
            raise ValueError(f"Invalid role: {role!r}")
        pid = self._require(project)
        if not self.user_exists(user):
            raise KeyError(user)
        self._x("INSERT OR REPLACE INTO project_users VALUES (?,?,?)", (pid, user, role))

    def remove_role(self, project: str, user: str) -> bool:
        pid = self._require(project)
        return self._x("DELETE FROM project_users WHERE project=? AND login=?", (pid, user)) > 0

    def role(self, user: str, project: str) -> str | None:
        pid = self.canonical_project(project)
        if pid is None:
            return None
        rows = self._q("SELECT role FROM project_users WHERE project=? AND login=?", (pid, user))
        return str(rows[0]["role"]) if rows else None

    def project_users(self, project: str) -> list[tuple[str, str]]:
        """(login, role) of a project's members, by login."""
        pid = self._require(project)
        rows = self._q(
            "SELECT login, role FROM project_users WHERE project=? ORDER BY login", (pid,)
        )
        return [(r["login"], r["role"]) for r in rows]

    def roles_of(self, user: str) -> list[tuple[str, str]]:
        """(project, role) for every project the user has a role in, by project."""
        rows = self._q(
            "SELECT project, role FROM project_users WHERE login=? ORDER BY project", (user,)
        )
        return [(r["project"], r["role"]) for r in rows]

    # -- the checks --------------------------------------------------------------------------
    def can_read(self, user: str, project: str) -> bool:
        """Facts 1.2: a member/owner/collaborator, a site admin, or a non-private project."""
        p = self.project(project)
        if p is None:
            return False
        if p.accessibility != "private" or self.is_admin(user):
            return True
        return self.role(user, p.id) is not None

    def can_read_data(self, user: str, project: str) -> bool:
        """The subjects/experiments/files of a project: members and admins, or anyone if public
        (a protected project shows itself, not its data, to non-members)."""
        p = self.project(project)
        if p is None:
            return False
        if p.accessibility == "public" or self.is_admin(user):
            return True
        return self.role(user, p.id) is not None

    def can_edit(self, user: str, project: str) -> bool:
        """Create subjects and sessions, prearchive operations, archive: owners, members, admins."""
        if self.canonical_project(project) is None:
            return False
        return self.is_admin(user) or self.role(user, project) in ("owner", "member")

    def can_delete(self, user: str, project: str) -> bool:
        """Delete subjects, sessions, scans, files: owners and admins (members may not)."""
        if self.canonical_project(project) is None:
            return False
        return self.is_admin(user) or self.role(user, project) == "owner"

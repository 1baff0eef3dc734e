"""Projects, their users and settings, and the pre-flight checks of facts section 2.

- ``GET /data/projects`` (readable projects; with ``permissions=create|edit|read|delete`` the
  rows ``{id, secondary_id}`` where the user has that right, ProjectListResource.java:499-520);
- ``GET /data/projects/P`` → 200 ``items[0].data_fields`` when readable, else 404 "Unable to find
  the specified experiment." (ProjectResource.java:76, 304-333; facts 2);
- ``PUT /data/projects/P`` creates a project (site admins only). XNAT takes a project XML body
  here; the sandbox takes a bare PUT with optional ``?secondary_ID=&accessibility=&name=`` (and
  ignores any body), which is the part of XNAT's behaviour a client needs to set up a test;
- ``GET|PUT|DELETE /data/projects/P/users/{Owners|Members|Collaborators}/NAME``
  (ProjectMemberResource: 404 for an unknown project or group, 403 unless owner or admin, an
  unknown user is "invited" and 200, the guest 412);
- ``GET /data/projects/P/prearchive_code`` and ``PUT …/prearchive_code/{0|4|5}`` (facts 3.5),
  ``PUT …/accessibility/{private|protected|public}``;
- ``GET /xapi/access/projects`` (the user's project roles, DataAccessApi.java:69-78).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from xnatio.sandbox import views
from xnatio.sandbox.access import GROUPS, Access, Project
from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.routes import listing, respond, respond_json, route

if TYPE_CHECKING:
    from xnatio.sandbox.server import Request, Response

_P = r"/data(?:/archive)?/projects/(?P<p>[^/]+)"
MSG_NOT_FOUND = "Unable to find the specified experiment."  # sic: ProjectResource.java:76
GROUP_NAMES = {"owner": "Owners", "member": "Members", "collaborator": "Collaborators"}


def access_of(req: Request) -> Access:
    return req.server.access


def user_of(req: Request) -> str:
    assert req.principal is not None
    return req.principal.user


def readable_project(req: Request, project: str) -> Project:
    """The project if the user may read it (facts 1.2), else XNAT's 404 (facts 2)."""
    access = access_of(req)
    p = access.project(project)
    if p is None or not access.can_read(user_of(req), p.id):
        raise HttpError(404, MSG_NOT_FOUND)
    return p


def project_fields(p: Project) -> dict[str, str]:
    return {
        "ID": p.id,
        "secondary_ID": p.secondary_id,
        "name": p.name,
        "description": p.description,
        "pi_firstname": "",
        "pi_lastname": "",
        "URI": f"/data/projects/{p.id}",
    }


# -- projects ----------------------------------------------------------------------------------
@route("GET", r"/data(?:/archive)?/projects")
def projects(req: Request, _: re.Match[str]) -> Response:
    access, user = access_of(req), user_of(req)
    right = req.params.get("permissions")
    if right:
        # ProjectListResource.java:499-520: only id and secondary_id, for the projects where
        # the user holds that right on dataType (site admins: all projects).
        check = {
            "read": access.can_read_data,
            "create": access.can_edit,
            "edit": access.can_edit,
            "delete": access.can_delete,
        }.get(right)
        if check is None:
            raise HttpError(400, f"Invalid permissions value: {right}")
        rows = [
            {"id": p.id, "secondary_id": p.secondary_id}
            for p in access.projects()
            if check(user, p.id)
        ]
        return listing(req, rows, title="Projects", columns=["id", "secondary_id"])
    rows = [project_fields(p) for p in access.projects() if access.can_read(user, p.id)]
    rows, columns = views.select_columns(rows, req.params.get("columns"))
    return listing(req, rows, title="Projects", columns=columns or list(project_fields_columns()))


def project_fields_columns() -> tuple[str, ...]:
    return ("ID", "secondary_ID", "name", "description", "pi_firstname", "pi_lastname", "URI")


@route("GET", _P)
def project(req: Request, m: re.Match[str]) -> Response:
    p = readable_project(req, m["p"])
    fields: dict[str, Any] = project_fields(p)
    fields.pop("URI")
    fields["accessibility"] = p.accessibility
    fields["aliases"] = ",".join(p.aliases)
    return respond_json(
        {"items": [{"data_fields": fields, "meta": {"xsi:type": "xnat:projectData"}}]}
    )


@route("PUT", _P)
def project_put(req: Request, m: re.Match[str]) -> Response:
    access, user = access_of(req), user_of(req)
    # Fields may also come as schema paths (``xnat:projectData/secondary_ID=…``, as pyxnat's
    # create() sends them with ``xsiType=xnat:projectData``).
    prefix = "xnat:projectdata/"
    params = {
        (k[len(prefix) :] if k.lower().startswith(prefix) else k): v for k, v in req.params.items()
    }
    existing = access.project(m["p"])
    try:
        if existing is not None:
            if not access.can_delete(user, existing.id):  # project settings: owners and admins
                raise HttpError(403, f"User {user} cannot modify project {existing.id}.")
            access.update_project(
                existing.id,
                secondary_id=params.get("secondary_ID"),
                accessibility=params.get("accessibility"),
            )
            return respond(200, existing.id, "text/plain")
        if not access.is_admin(user):
            raise HttpError(403, f"User {user} cannot create projects.")
        aliases = tuple(a for a in params.get("alias", "").split(",") if a)
        access.create_project(
            m["p"],
            secondary_id=params.get("secondary_ID"),
            name=params.get("name"),
            accessibility=params.get("accessibility", "private"),
            description=params.get("description", ""),
            aliases=aliases,
            owner=user,
        )
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None
    return respond(201, m["p"], "text/plain")


@route("GET", _P + r"/prearchive_code")
def prearchive_code(req: Request, m: re.Match[str]) -> Response:
    p = readable_project(req, m["p"])
    return respond(200, str(p.prearchive_code), "text/plain")


def _owned_project(req: Request, project: str) -> Project:
    p = readable_project(req, project)
    if not access_of(req).can_delete(user_of(req), p.id):
        raise HttpError(403, f"User {user_of(req)} cannot modify project {p.id}.")
    return p


@route("PUT", _P + r"/prearchive_code/(?P<code>[^/]+)")
def prearchive_code_put(req: Request, m: re.Match[str]) -> Response:
    p = _owned_project(req, m["p"])
    try:
        access_of(req).set_prearchive_code(p.id, int(m["code"]))
    except ValueError:
        raise HttpError(400, f"Invalid prearchive code: {m['code']}") from None
    return respond(200, "", "text/plain")


@route("PUT", _P + r"/accessibility/(?P<a>[^/]+)")
def accessibility_put(req: Request, m: re.Match[str]) -> Response:
    p = _owned_project(req, m["p"])
    try:
        access_of(req).update_project(p.id, accessibility=m["a"])
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None
    return respond(200, "", "text/plain")


@route("GET", _P + r"/accessibility")
def accessibility(req: Request, m: re.Match[str]) -> Response:
    return respond(200, readable_project(req, m["p"]).accessibility, "text/plain")


# -- project users (ProjectMemberResource) -----------------------------------------------------
def _role_of_group(project: str, group: str) -> str | None:
    """The role a group name stands for: ``P_owner``, ``owner`` or the display name ``Owners``
    (ProjectMemberResource tries the group ID, then PROJECT_ID + "_" + name, then the display
    names of the project's groups)."""
    if group.startswith(project + "_"):
        group = group[len(project) + 1 :]
    if group in GROUP_NAMES:
        return group
    for role, display in GROUP_NAMES.items():
        if group == display:
            return role
    return GROUPS.get(group) if group.islower() else None


def _members(req: Request, p: Project) -> Response:
    rows = [
        {
            "GROUP_ID": f"{p.id}_{role}",
            "displayname": GROUP_NAMES[role],
            "login": login,
            "firstname": "",
            "lastname": "",
            "email": "",
        }
        for login, role in access_of(req).project_users(p.id)
    ]
    return listing(req, rows, title="Projects")


@route("GET", _P + r"/users")
def project_users(req: Request, m: re.Match[str]) -> Response:
    return _members(req, readable_project(req, m["p"]))


@route("PUT DELETE", _P + r"/users/(?P<g>[^/]+)/(?P<u>[^/]+)")
def project_user_put(req: Request, m: re.Match[str]) -> Response:
    access, user = access_of(req), user_of(req)
    p = access.project(m["p"])
    role = _role_of_group(p.id, m["g"]) if p is not None else None
    if p is None or role is None or not access.can_read(user, p.id):
        raise HttpError(404, "")
    logins = [u.strip() for u in m["u"].split(",") if u.strip()]
    known = [u for u in logins if access.user_exists(u)]
    if req.method == "DELETE" and not known:
        raise HttpError(404, "")
    if not access.can_delete(user, p.id):
        raise HttpError(403, "")
    if "guest" in logins:
        raise HttpError(412, "")
    for login in known:
        if req.method == "DELETE":
            if access.role(login, p.id) == role:
                access.remove_role(p.id, login)
        else:
            access.set_role(p.id, login, role)
    # Unknown users are "invited" by e-mail on XNAT and the answer is still 200.
    return _members(req, p)


# -- /xapi/access ------------------------------------------------------------------------------
@route("GET", r"/xapi/access/projects")
def access_projects(req: Request, _: re.Match[str]) -> Response:
    """The user's project roles (RoleHolder.getUserProjectRoles; key names *(inferred)*)."""
    rows = [
        {"project": project, "role": role, "group": f"{project}_{role}"}
        for project, role in access_of(req).roles_of(user_of(req))
    ]
    return respond_json(rows)

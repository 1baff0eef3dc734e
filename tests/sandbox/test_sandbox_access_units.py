"""Unit tests of ``xnatio.sandbox.access``: projects, users, roles, checks (facts 1.2, 3.5)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from xnatio.sandbox.access import Access
from xnatio.sandbox.catalog import Catalog, DataFolderInUse


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog(tmp_path / "data")
    yield c
    c.close()


@pytest.fixture
def access(catalog: Catalog) -> Access:
    a = catalog.access
    a.add_user("root", "pw-root", admin=True)
    a.add_user("alice", "pw-a")
    a.add_user("bob", "pw-b")
    a.add_user("carol", "pw-c")
    a.add_user("dave", "pw-d")
    a.create_project("P", aliases=("P_ALIAS",))
    a.set_role("P", "alice", "owner")
    a.set_role("P", "bob", "member")
    a.set_role("P", "carol", "collaborator")
    return a


def test_canonical_project_by_id_or_alias(access: Access) -> None:
    assert access.canonical_project("P") == "P"
    assert access.canonical_project("P_ALIAS") == "P"  # facts 3.5: canonical ID for an alias
    assert access.canonical_project("Q") is None
    assert access.canonical_project("Unassigned") is None
    assert access.canonical_project("") is None


def test_roles_read_edit_delete(access: Access) -> None:
    # Facts 1.2: owners/members/collaborators and admins read a private project.
    for user in ("root", "alice", "bob", "carol"):
        assert access.can_read(user, "P"), user
    assert not access.can_read("dave", "P")
    assert not access.can_read("nobody", "P")
    # Collaborators are read-only; owners and members (and admins) edit.
    assert [u for u in ("root", "alice", "bob", "carol", "dave") if access.can_edit(u, "P")] == [
        "root",
        "alice",
        "bob",
    ]
    assert [u for u in ("root", "alice", "bob", "carol", "dave") if access.can_delete(u, "P")] == [
        "root",
        "alice",
    ]
    assert access.can_edit("alice", "P_ALIAS")
    assert not access.can_edit("root", "Q")  # no such project, even for an admin
    assert access.is_admin("root") and not access.is_admin("alice")


def test_accessibility(access: Access) -> None:
    access.update_project("P", accessibility="protected")
    assert access.can_read("dave", "P")  # facts 1.2: any non-private project is readable
    assert not access.can_read_data("dave", "P")  # ...but a protected project's data is not
    assert not access.can_edit("dave", "P")
    access.update_project("P", accessibility="public")
    assert access.can_read_data("dave", "P")
    assert not access.can_edit("dave", "P")


def test_prearchive_code(access: Access) -> None:
    assert access.prearchive_code("P") == 0
    access.set_prearchive_code("P_ALIAS", 5)
    assert access.prearchive_code("P") == 5
    with pytest.raises(ValueError):
        access.set_prearchive_code("P", 3)
    assert access.prearchive_code("Unassigned") == 0


def test_passwords_and_roles_survive_restart(
    tmp_path: Path, access: Access, catalog: Catalog
) -> None:
    catalog.close()  # the server stops (its catalog holds the database while open)
    restarted = Catalog(tmp_path / "data")
    try:
        again = restarted.access
        assert again.check_password("alice", "pw-a")
        assert not again.check_password("alice", "pw-b")
        assert not again.check_password("nobody", "")
        assert again.role("alice", "P") == "owner"
        assert again.canonical_project("P_ALIAS") == "P"
    finally:
        restarted.close()


def test_create_project_refuses_bad_input(access: Access) -> None:
    assert access.create_project("Q") is True
    assert access.create_project("Q") is False  # exists: left as it is
    for bad in ("", "a/b", "Unassigned", "with space"):
        with pytest.raises(ValueError):
            access.create_project(bad)
    with pytest.raises(ValueError):
        access.create_project("P_ALIAS")  # an alias of P
    with pytest.raises(ValueError):
        access.create_project("R", accessibility="secret")
    with pytest.raises(KeyError):
        access.set_role("P", "nobody", "member")
    with pytest.raises(ValueError):
        access.set_role("P", "dave", "admin")


def test_set_role_replaces_the_previous_role(access: Access) -> None:
    access.set_role("P", "bob", "collaborator")
    assert access.role("bob", "P") == "collaborator"
    assert not access.can_edit("bob", "P")
    assert access.remove_role("P", "bob")
    assert not access.can_read("bob", "P")
    assert access.roles_of("alice") == [("P", "owner")]


def test_a_second_server_on_the_same_folder_is_refused(tmp_path: Path, catalog: Catalog) -> None:
    """The catalog holds its database while open: a second one on the folder gets one clear
    error and leaves the first one's files in the making alone; after a stop it opens."""
    in_flight = tmp_path / "data" / "tmp" / "st-body-in-flight"
    in_flight.write_bytes(b"a request's file in the making")
    with pytest.raises(DataFolderInUse, match="in use by another sandbox server"):
        Catalog(tmp_path / "data")
    assert in_flight.exists()
    catalog.close()
    again = Catalog(tmp_path / "data")
    again.close()
    assert not in_flight.exists()  # a leftover of a stopped server is cleaned up

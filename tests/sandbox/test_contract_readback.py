"""Contract tests over real HTTP for reading back (facts section 4) and deleting what was
archived, each citing the facts line it checks (``shared/xnat-api.md``)."""

from __future__ import annotations

import csv
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sandbox_helpers import h3, import_zip, instance_files, session, zip_bytes

from xnatio.sandbox import SandboxServer
from xnatio.synth import SyntheticSession

pytestmark = pytest.mark.integration

USERS = {"admin": "a-pw", "owner": "o-pw", "member": "m-pw", "collab": "c-pw", "outsider": "x-pw"}
FILE_COLUMNS = [
    "Name",
    "Size",
    "URI",
    "collection",
    "file_tags",
    "file_format",
    "file_content",
    "cat_ID",
    "digest",
]
SCAN_COLUMNS = [
    "xnat_imagescandata_id",
    "ID",
    "type",
    "quality",
    "xsiType",
    "note",
    "series_description",
    "URI",
]


class Site:
    def __init__(self, server: SandboxServer, synth: SyntheticSession) -> None:
        self.server = server
        self.synth = synth
        self.base = server.url + "/data/projects/P/subjects/S/experiments/E"

    def http(self, user: str = "member") -> requests.Session:
        http = requests.Session()
        http.auth = (user, USERS[user])
        return http


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("readback")
    synth = session(tmp, series=2, instances=3)
    with SandboxServer(tmp / "server", users=USERS, projects=["P"]) as server:
        for user, role in (("owner", "owner"), ("member", "member"), ("collab", "collaborator")):
            server.access.set_role("P", user, role)
        http = requests.Session()
        http.auth = ("member", USERS["member"])
        r = import_zip(
            http,
            server,
            zip_bytes(instance_files(synth)),
            PROJECT_ID="P",
            SUBJECT_ID="S",
            EXPT_LABEL="E",
            dest="/archive",
        )
        assert r.status_code == 200, r.text
        yield Site(server, synth)


def experiment_id(site: Site) -> str:
    doc = site.http().get(site.base, params={"format": "json"}).json()
    return str(doc["items"][0]["data_fields"]["ID"])


# -- the experiment ----------------------------------------------------------------------------
def test_experiment_document(site: Site) -> None:
    # facts 4, "…/subjects/S/experiments/E?format=json → items[0].data_fields"
    r = site.http().get(site.base, params={"format": "json"})
    fields = r.json()["items"][0]["data_fields"]
    assert (fields["label"], fields["project"], fields["UID"]) == ("E", "P", site.synth.study_uid)
    # The same experiment by ID: /data/experiments/{ID} and /data/archive/experiments/{ID}.
    eid = fields["ID"]
    for path in (f"/data/experiments/{eid}", f"/data/archive/experiments/{eid}"):
        other = site.http().get(site.server.url + path, params={"format": "json"})
        assert other.json()["items"][0]["data_fields"]["label"] == "E"


def test_missing_experiment_404_with_message(site: Site) -> None:
    # facts 4, "404 'Unable to find the specified experiment.'"
    r = site.http().get(site.base[: -len("/E")] + "/NOPE", params={"format": "json"})
    assert r.status_code == 404 and h3(r) == "Unable to find the specified experiment."


def test_experiment_check_by_project_and_label(site: Site) -> None:
    # facts 3.5, "check: GET /data/projects/P/experiments/{label}?format=json → 200 / 404
    # 'Unable to find the specified experiment.'" (ExperimentResource.java:63-97)
    url = site.server.url + "/data/projects/P/experiments/"
    found = site.http().get(url + "E", params={"format": "json"})
    assert found.status_code == 200
    assert found.json()["items"][0]["data_fields"]["label"] == "E"
    missing = site.http().get(url + "NOPE", params={"format": "json"})
    assert missing.status_code == 404 and h3(missing) == "Unable to find the specified experiment."
    archive = site.server.url + "/data/archive/projects/P/subjects/S/experiments/E"
    assert site.http().get(archive, params={"format": "json"}).status_code == 200


@pytest.mark.parametrize(("user", "project"), [("member", "NOPE"), ("outsider", "P")])
def test_missing_or_unreadable_project_404_without_message(
    site: Site, user: str, project: str
) -> None:
    # facts 4, "missing/unreadable project → 404 without message" (SubjAssessmentResource:74-82)
    url = f"{site.server.url}/data/projects/{project}/subjects/S/experiments/E"
    r = site.http(user).get(url, params={"format": "json"})
    assert r.status_code == 404 and h3(r) == ""
    eid = experiment_id(site)
    r = site.http("outsider").get(f"{site.server.url}/data/experiments/{eid}")
    assert r.status_code == 404


# -- scans -------------------------------------------------------------------------------------
def test_scan_listing_columns(site: Site) -> None:
    # facts 4, "…/scans?format=json → xnat_imagescandata_id, ID, type, quality, xsiType, note,
    # series_description, URI (/data/experiments/{expt ID}/scans/{ID}) + totalRecords"
    rs = site.http().get(site.base + "/scans", params={"format": "json"}).json()["ResultSet"]
    assert rs["totalRecords"] == "2"
    eid = experiment_id(site)
    for row in rs["Result"]:
        assert list(row) == SCAN_COLUMNS
        assert row["URI"] == f"/data/experiments/{eid}/scans/{row['ID']}"
    # Scan ID = Series Number (facts 4, unconfirmed)
    assert sorted(r["ID"] for r in rs["Result"]) == sorted(str(n) for n in site.synth.series)


def test_scan_listing_columns_parameter(site: Site) -> None:
    # facts 4, "columns= replaces them" (QueryOrganizerResource.java:160-180); XNAT adds URI
    rows = (
        site.http()
        .get(site.base + "/scans", params={"format": "json", "columns": "ID,series_description"})
        .json()["ResultSet"]["Result"]
    )
    assert all(list(r) == ["ID", "series_description", "URI"] for r in rows)  # URI always


# -- files -------------------------------------------------------------------------------------
def test_file_listing_columns_and_uris(site: Site) -> None:
    # facts 4, "…/scans/{ID}/resources/{label|id}/files?format=json → Name, Size, URI,
    # collection, file_tags, file_format, file_content, cat_ID, digest (CU:79); URI
    # /data[/projects/P/subjects/{subject ID}]/experiments/{expt ID}/scans/{scan ID}/resources/
    # {numeric resource id}/files/{path}; digest = catalog MD5 or ""; all strings; ResultSet also
    # has "Columns":[{"key":"URI",…}] and "title":"Files" (FL:621-623, 1170-1176)"
    http = site.http()
    eid = experiment_id(site)
    doc = http.get(site.base, params={"format": "json"}).json()
    subject_id = doc["items"][0]["data_fields"]["subject_ID"]
    scan = str(min(site.synth.series))
    rs = http.get(f"{site.base}/scans/{scan}/resources/DICOM/files", params={"format": "json"})
    result_set = rs.json()["ResultSet"]
    assert result_set["title"] == "Files"
    assert [c["key"] for c in result_set["Columns"]] == FILE_COLUMNS
    rows = result_set["Result"]
    assert len(rows) == 3
    for row in rows:
        assert list(row) == FILE_COLUMNS
        assert all(isinstance(v, str) for v in row.values())
        m = re.fullmatch(
            rf"/data/projects/P/subjects/{subject_id}/experiments/{eid}/scans/{scan}"
            r"/resources/(\d+)/files/(.+)",
            row["URI"],
        )
        assert m, row["URI"]
        assert row["cat_ID"] == m[1]
        assert re.fullmatch(r"[0-9a-f]{32}", row["digest"])
        data = http.get(site.server.url + row["URI"])
        assert data.status_code == 200 and len(data.content) == int(row["Size"])
    # By experiment ID: the URI has no project part; the numeric resource id lists it too.
    rid = rows[0]["cat_ID"]
    by_id = http.get(
        f"{site.server.url}/data/experiments/{eid}/scans/{scan}/resources/{rid}/files",
        params={"format": "json"},
    ).json()["ResultSet"]["Result"]
    assert [r["Name"] for r in by_id] == [r["Name"] for r in rows]
    assert by_id[0]["URI"].startswith(f"/data/experiments/{eid}/scans/{scan}/resources/{rid}/")


def test_resource_listing_has_numeric_ids(site: Site) -> None:
    scan = str(min(site.synth.series))
    rows = (
        site.http()
        .get(f"{site.base}/scans/{scan}/resources", params={"format": "json"})
        .json()["ResultSet"]["Result"]
    )
    assert [r["label"] for r in rows] == ["DICOM"]
    assert rows[0]["xnat_abstractresource_id"].isdigit()
    assert rows[0]["file_count"] == "3"


# -- formats -----------------------------------------------------------------------------------
def test_listing_formats_csv_xml_html(site: Site) -> None:
    # facts 4, "format=json|xml|csv|html; xml = <ResultSet><results><columns>…<rows><row><cell>;
    # csv = header row, \n line ends" (SR:235-264, 507-553; XT:838-907)
    http = site.http()
    url = site.base + "/scans"
    as_csv = http.get(url, params={"format": "csv"})
    assert as_csv.headers["Content-Type"].startswith("text/csv")
    assert "\r" not in as_csv.text and as_csv.text.endswith("\n")
    table = list(csv.reader(io.StringIO(as_csv.text)))
    assert table[0] == SCAN_COLUMNS and len(table) == 3
    as_xml = http.get(url, params={"format": "xml"})
    root = ET.fromstring(as_xml.content)
    ns = {"x": "http://nrg.wustl.edu/xe"}
    assert root.tag.endswith("ResultSet")
    columns = [c.text for c in root.findall("x:results/x:columns/x:column", ns)]
    assert columns == SCAN_COLUMNS
    rows = root.findall("x:results/x:rows/x:row", ns)
    assert len(rows) == 2 and len(rows[0].findall("x:cell", ns)) == len(SCAN_COLUMNS)
    as_html = http.get(url, params={"format": "html"})
    assert as_html.headers["Content-Type"].startswith("text/html")
    assert as_html.text.count("<tr>") == 3 and "<th>series_description</th>" in as_html.text
    files = http.get(
        f"{site.base}/scans/{min(site.synth.series)}/resources/DICOM/files",
        params={"format": "csv"},
    )
    assert next(csv.reader(io.StringIO(files.text))) == FILE_COLUMNS
    prearchive = http.get(site.server.url + "/data/prearchive/projects/P", params={"format": "csv"})
    assert next(csv.reader(io.StringIO(prearchive.text)))[:2] == ["project", "timestamp"]
    for listing in ("/data/projects", "/data/projects/P/subjects", "/data/projects/P/experiments"):
        r = http.get(site.server.url + listing, params={"format": "csv"})
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv"), listing


# -- deleting ----------------------------------------------------------------------------------
def _upload(site: Site, tmp_path: Path, label: str) -> str:
    synth = session(tmp_path, series=2, instances=2, seed=7)
    r = import_zip(
        site.http(),
        site.server,
        zip_bytes(instance_files(synth)),
        PROJECT_ID="P",
        SUBJECT_ID="S",
        EXPT_LABEL=label,
        dest="/archive",
    )
    assert r.status_code == 200, r.text
    return f"{site.server.url}/data/projects/P/subjects/S/experiments/{label}"


def test_delete_file_scan_experiment_by_role(site: Site, tmp_path: Path) -> None:
    base = _upload(site, tmp_path, "DEL1")
    scans = site.http().get(base + "/scans", params={"format": "json"}).json()
    first, second = (r["ID"] for r in scans["ResultSet"]["Result"])
    files = site.http().get(f"{base}/scans/{first}/resources/DICOM/files").json()
    file_uri = site.server.url + files["ResultSet"]["Result"][0]["URI"]
    # A file: the edit right (collaborators and outsiders may not).
    assert site.http("collab").delete(file_uri).status_code == 403
    assert site.http("outsider").delete(file_uri).status_code == 404  # cannot see it at all
    assert site.http("member").delete(file_uri).status_code == 200
    assert site.http().get(file_uri).status_code == 404
    assert site.http("member").delete(file_uri).status_code == 404
    left = site.http().get(f"{base}/scans/{first}/resources/DICOM/files").json()
    assert left["ResultSet"]["totalRecords"] == "1"
    # A scan and an experiment: the delete right (owners, admins; not members).
    assert site.http("member").delete(f"{base}/scans/{second}").status_code == 403
    assert site.http("owner").delete(f"{base}/scans/{second}").status_code == 200
    assert site.http().get(f"{base}/scans/{second}").status_code == 404
    assert site.http("member").delete(base).status_code == 403
    assert site.http("owner").delete(base).status_code == 200
    assert site.http().get(base, params={"format": "json"}).status_code == 404


# -- an unmodified third-party client: pyxnat (PyPI), in its own virtual environment ------------
PYXNAT_VERSION = "1.6.4"
# pyxnat's derivatives modules import nibabel and pandas at start without declaring them.
PYXNAT_PACKAGES = (f"pyxnat=={PYXNAT_VERSION}", "nibabel", "pandas")
OFFLINE_HINTS = (
    "No matching distribution",
    "Could not find a version",
    "Connection",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Max retries exceeded",
)

PYXNAT_SCRIPT = """
import json, sys
from pyxnat import Interface

url, user, password = sys.argv[1:4]
x = Interface(server=url, user=user, password=password)
project = x.select.project("P")
created = x.select.project("MADE_BY_PYXNAT")
created.create()
out = {"project_exists": project.exists(), "created": created.exists(), "experiments": {}}
for e in project.subject("S").experiments():
    label = e.label()
    scans = {}
    for scan in e.scans():
        scans[scan.id()] = len(scan.resource("DICOM").files().get())
    out["experiments"][label] = scans
print(json.dumps(out))
"""


def pyxnat_python(request: pytest.FixtureRequest) -> Path:
    """pyxnat installed from PyPI into a venv cached in pytest's cache dir (once; a temporary
    folder when the cache is off, ``-p no:cacheprovider``)."""
    import subprocess
    import sys

    name = f"venv-pyxnat-{PYXNAT_VERSION}"
    cache = getattr(request.config, "cache", None)
    venv = Path(
        cache.mkdir(name) if cache is not None else request.getfixturevalue("tmp_path") / name
    )
    python = venv / "bin" / "python"
    marker = venv / "installed"
    if marker.exists() and python.exists():
        return python
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", *PYXNAT_PACKAGES],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            output = done.stderr + done.stdout
            if any(hint in output for hint in OFFLINE_HINTS):
                pytest.skip(f"PyPI unreachable, cannot install pyxnat: {output.strip()[-300:]}")
            raise AssertionError(f"installing pyxnat failed:\n{output}")
    marker.touch()
    return python


@pytest.mark.slow
def test_pyxnat_lists_what_xio_uploaded(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """issue 11: an unmodified pyxnat (it reads listings with format=csv) lists the experiments,
    scans and files of a session that xio uploaded into the sandbox, with the right counts."""
    import json
    import subprocess
    import time

    from upload_helpers import PASSWORD, USER, run_xio, xio_env

    python = pyxnat_python(request)
    synth = session(tmp_path, series=2, instances=3)
    with SandboxServer(
        tmp_path / "server", users={USER: PASSWORD}, projects=["P"], idle_seconds=1
    ) as server:
        # Direct-Archive: the experiment appears once the session has been idle (facts 1.6).
        run = run_xio(
            ["upload-dicom", "P", "S", "E", str(synth.root), "--direct-archive", "--no-verify"],
            xio_env(server.url, tmp_path / "home"),
        )
        deadline = time.monotonic() + 60
        while "E" not in server.experiment_labels("P") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "E" in server.experiment_labels("P"), run.stdout + run.stderr
        while len(server.archived_files("P", "S", "E")) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        done = subprocess.run(
            [str(python), "-c", PYXNAT_SCRIPT, server.url, USER, PASSWORD],
            capture_output=True,
            text=True,
            timeout=300,
            env={"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {str(number): len(uids) for number, uids in synth.series.items()}
    assert found == {"project_exists": True, "created": True, "experiments": {"E": expected}}

"""The one entry point (issue 12): every default in one place, and the layers that call it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import click
import pytest

from xnatio import defaults
from xnatio.cli.upload import upload_dicom
from xnatio.models import Batch
from xnatio.pipeline import UploadOptions
from xnatio.retry import RetryPolicy
from xnatio.settings import Settings
from xnatio.transports.dicom_store.send import send_associations
from xnatio.transports.rest import RestTarget
from xnatio.uploaders import send_dicom_store, upload_dicom_parallel_rest

SRC = Path(__file__).resolve().parent.parent / "src" / "xnatio"


def _option_default(name: str) -> object:
    [param] = [p for p in upload_dicom.params if isinstance(p, click.Option) and p.name == name]
    return param.default


def test_every_layer_takes_its_defaults_from_one_place() -> None:
    rest = inspect.signature(upload_dicom_parallel_rest).parameters
    cstore = inspect.signature(send_dicom_store).parameters
    store_api = inspect.signature(send_associations).parameters
    target = {f.name: f.default for f in dataclasses.fields(RestTarget)}
    options = {f.name: f.default for f in dataclasses.fields(UploadOptions)}
    expected = {
        "upload_workers": defaults.UPLOAD_WORKERS,
        "archive_workers": defaults.ARCHIVE_WORKERS,
        "archive_format": defaults.ARCHIVE_FORMAT,
        "overwrite": defaults.OVERWRITE,
        "archive_wait": defaults.ARCHIVE_WAIT,
    }
    for name, value in expected.items():
        assert rest[name].default == value == target[name] == options[name], name
        assert _option_default(name) == value, name
    for name, value in (("timeout", defaults.REQUEST_TIMEOUT), ("retries", defaults.RETRIES)):
        assert rest[name].default == value == options[name] == _option_default(name), name
    assert rest["num_batches"].default == target["num_batches"] == defaults.REST_BATCHES
    assert cstore["num_batches"].default == defaults.DICOM_STORE_BATCHES
    assert cstore["retries"].default == defaults.DICOM_STORE_API_RETRIES
    assert RetryPolicy().retries == defaults.RETRIES
    for name in ("max_pdu", "acse_timeout", "dimse_timeout", "network_timeout"):
        assert cstore[name].default == options[name] == _option_default(name), name
    for name, value in (
        ("port", defaults.DICOM_PORT),
        ("called_aet", defaults.CALLED_AET),
        ("calling_aet", defaults.CALLING_AET),
    ):
        assert cstore[name].default == value == store_api[name].default, name
    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    assert fields["dicom_port"] == defaults.DICOM_PORT
    assert fields["dicom_called_aet"] == defaults.CALLED_AET
    assert fields["dicom_calling_aet"] == defaults.CALLING_AET


def test_no_layer_spells_a_default_of_its_own() -> None:
    """The numbers of xnatio.defaults appear as literals nowhere else in the layers that used to
    repeat them (the CLI, the API, the pipeline, the REST target, the client, the retry policy)."""
    owners = ["cli/upload.py", "uploaders.py", "pipeline.py", "retry.py", "xnat/client.py"]
    owners += sorted(str(p.relative_to(SRC)) for p in (SRC / "transports/rest").glob("*.py"))
    spelled = {defaults.REQUEST_TIMEOUT, defaults.ARCHIVE_WAIT, float(defaults.UPLOAD_WORKERS)}
    for rel in owners:
        tree = ast.parse((SRC / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and type(node.value) in (int, float):
                assert node.value not in spelled, f"{rel}:{node.lineno} spells {node.value}"


def _defaults_spelled_in(tree: ast.AST) -> list[ast.expr]:
    """The expressions that give a default: function parameter defaults, class field values
    (dataclass fields) and the fall-backs of ``x or <default>``."""
    found: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arguments):
            found += [d for d in node.defaults + node.kw_defaults if d is not None]
        elif isinstance(node, ast.ClassDef):
            found += [s.value for s in node.body if isinstance(s, ast.AnnAssign) and s.value]
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            # `self.server or "XNAT"` names the server in a message; it is no AE title.
            if "server" not in ast.unparse(node.values[0]):
                found += node.values[1:]
        elif isinstance(node, ast.IfExp):
            found.append(node.orelse)
    return found


def test_the_dicom_layers_spell_no_default_of_their_own() -> None:
    """C-STORE's port, AE titles, association count, timeouts and error-line limit come from
    xnatio.defaults in the C-STORE sender, the settings resolver and the public API."""
    numbers = {
        defaults.DICOM_PORT,
        defaults.DICOM_STORE_BATCHES,
        defaults.ACSE_TIMEOUT,
        defaults.DIMSE_TIMEOUT,
        defaults.NETWORK_TIMEOUT,
        defaults.MAX_ERROR_LINES,
    }
    titles = {defaults.CALLED_AET, defaults.CALLING_AET}
    for rel in ("transports/dicom_store/send.py", "settings.py", "uploaders.py"):
        tree = ast.parse((SRC / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and type(node.value) in (int, float):
                assert node.value not in numbers, f"{rel}:{node.lineno} spells {node.value}"
        for expr in _defaults_spelled_in(tree):
            for node in ast.walk(expr):
                if isinstance(node, ast.Constant) and node.value in titles:
                    raise AssertionError(f"{rel}:{node.lineno} spells the AE title {node.value!r}")


def test_the_cli_and_the_demo_call_the_library_not_each_other() -> None:
    for rel in ("cli/demo.py", "cli/upload.py"):
        text = (SRC / rel).read_text(encoding="utf-8")
        assert "from xnatio.pipeline import" in text, rel
    assert "xnatio.cli.upload" not in (SRC / "cli/demo.py").read_text(encoding="utf-8")
    resume = (SRC / "resume.py").read_text(encoding="utf-8")
    assert "transports.rest" not in resume and "prearchive/projects" not in resume


def test_one_of_each_helper() -> None:
    """One tar-header builder, one loopback test, one rule naming a file (issue 12)."""
    defined: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name.lstrip("_"), []).append(str(path.relative_to(SRC)))
    assert defined["is_loopback"] == ["settings.py"]
    assert defined["file_path"] == ["models.py"]
    assert "display_path" not in defined
    builders = [name for name in defined if "tar" in name and "header" in name]
    assert {b: defined[b] for b in builders if b != "tar_header_size"} == {
        "tar_header": ["archive.py", "transports/rest/bodies.py"]
    }
    bodies = (SRC / "transports/rest/bodies.py").read_text(encoding="utf-8")
    assert "TarInfo" not in bodies and "tobuf" not in bodies


def test_one_planner_one_progress_counter_one_result_assembler() -> None:
    """Issue 12's "one of each": both transports plan through xnatio.plan.Planner, count through
    xnatio.events.ProgressCounter and build their result with xnatio.result.assemble_result."""
    calls: dict[str, set[str]] = {}
    counted: set[str] = set()
    planners: set[str] = set()
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                calls.setdefault(node.func.id, set()).add(rel)
                if node.func.id == "ProgressEvent" and any(
                    k.arg == "batches_done" for k in node.keywords
                ):
                    counted.add(rel)
            if isinstance(node, ast.ClassDef) and any(
                isinstance(f, ast.FunctionDef) and f.name == "plan" for f in node.body
            ):
                planners.add(f"{rel}:{node.name}")
    assert planners == {
        "plan.py:Planner",  # the protocol
        "plan.py:RestPlanner",
        "transports/dicom_store/plan.py:AssociationPlanner",
    }
    # Only behind the planner interface.
    assert not [r for r in calls["plan_batches"] if r != "plan.py"]
    assert not [r for r in calls["plan_associations"] if r != "transports/dicom_store/plan.py"]
    assert "events.py" in counted  # the transports count through the one counter
    assert not [r for r in counted if r.startswith("transports/")]
    # The transports and the API build their results with the assembler, never by hand.
    builders = calls["UploadResult"]
    assert "result.py" in builders
    assert not [r for r in builders if r.startswith("transports/") or r == "uploaders.py"]


def test_the_first_batch_is_prepared_alone_so_its_request_leaves_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: with every batch prepared at once (each file checked against discovery), the
    first request waited for all of them (0.4-0.9 s at 100,000 files). The first batch is now
    prepared alone; the others start once it is (its preparation is slowed here so that they
    would start meanwhile if they could)."""
    import threading
    import time

    from upload_helpers import PASSWORD, TEST_PROJECTS, USER, upload
    from xnatio.sandbox import SandboxServer
    from xnatio.synth import generate_session
    from xnatio.transports.rest.send import BatchSender

    session = generate_session(tmp_path / "s", series=4, instances=40, image_size=(8, 8))
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()
    prepare = BatchSender.prepare

    def recorded(self: BatchSender, batch: Batch) -> object:
        with lock:
            seen.append((batch.index, "start"))
        if batch.index == 0:
            time.sleep(0.3)  # the others would start now, were they not waiting
        try:
            return prepare(self, batch)
        finally:
            with lock:
                seen.append((batch.index, "end"))

    monkeypatch.setattr(BatchSender, "prepare", recorded)
    users = {USER: PASSWORD}
    with SandboxServer(tmp_path / "xnat", users=users, projects=TEST_PROJECTS) as server:
        result = upload(server.url, session.root, tmp_path / "j.sqlite", batches=4, workers=4)
    assert result.success, result.errors
    assert len({index for index, _ in seen}) == 4
    assert seen[:2] == [(0, "start"), (0, "end")], seen

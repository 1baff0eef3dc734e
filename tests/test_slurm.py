"""Against a real Slurm cluster (``.ci/slurm-up`` starts a single-node one in CI).

Where no cluster answers, these tests skip with the reason; with ``XNATIO_REQUIRE_SLURM=1`` (set
by ``.ci/run``) they fail instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Read before conftest's autouse fixture removes every XNATIO_* variable from the environment.
REQUIRE_SLURM = os.environ.get("XNATIO_REQUIRE_SLURM", "") not in ("", "0")
SBATCH_TIMEOUT = 600  # seconds a whole array may take before the test gives up


def _cluster_problem() -> str | None:
    """Why no Slurm cluster is usable here, or None when sinfo lists an available node."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch/sinfo not installed (run .ci/slurm-up as root)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s (slurmctld not running? run .ci/slurm-up)"
    if out.returncode != 0:
        said = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()[-1]
        return f"sinfo failed: {said} (run .ci/slurm-up)"
    states = out.stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no Slurm node available (states: {', '.join(states) or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    problem = _cluster_problem()
    if problem is not None:
        if REQUIRE_SLURM:
            pytest.fail(f"XNATIO_REQUIRE_SLURM is set but {problem}")
        pytest.skip(problem)
    yield


def sbatch_wait(args: list[str], script: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``sbatch --wait`` a script (jobs inherit this process's environment, as sbatch does)."""
    return subprocess.run(
        ["sbatch", "--wait", "--chdir", str(cwd), *args, str(script)],
        capture_output=True,
        text=True,
        timeout=SBATCH_TIMEOUT,
        check=False,
        cwd=cwd,
    )


def test_cluster_runs_an_array(slurm: None, tmp_path: Path) -> None:
    """Four array tasks run, each sees its index and the array's size, and runs this venv's
    Python (the jobs of the upload-many tests run ``xio`` from it)."""
    script = tmp_path / "task.sh"
    script.write_text(
        "#!/bin/bash\n"
        f'exec "{sys.executable}" -c "import os, xnatio; '
        "print(os.environ['SLURM_ARRAY_TASK_ID'], os.environ['SLURM_ARRAY_TASK_COUNT'], "
        'xnatio.__name__)"\n'
    )
    out = sbatch_wait(["--array=0-3", f"--output={tmp_path}/out-%a.txt"], script, tmp_path)
    assert out.returncode == 0, out.stderr
    outputs = sorted(tmp_path.glob("out-*.txt"))
    assert [p.name for p in outputs] == [f"out-{i}.txt" for i in range(4)]
    for i, p in enumerate(outputs):
        assert p.read_text().split() == [str(i), "4", "xnatio"]

"""Many studies per run (``xio upload-many``): find studies, name them, plan, then send each.

    ROOT... -find_studies-> StudySet -build_plan-> Plan -(runner: one pipeline.upload per study)

:mod:`~xnatio.many.group` groups every DICOM file under the roots by StudyInstanceUID,
:mod:`~xnatio.many.templates` makes labels from header attributes, and :mod:`~xnatio.many.plan`
gives one row per study (ready, settling or error) that can be written, reviewed, edited and
read back. Each study is then one call of :func:`xnatio.pipeline.upload` (``Study.manifests()``).
"""

from __future__ import annotations

from xnatio.many.group import Study, StudySet, find_studies
from xnatio.many.plan import (
    Plan,
    Status,
    StudyPlan,
    build_plan,
    format_duration,
    is_plan_file,
    parse_duration,
    read_plan,
    write_plan,
)
from xnatio.many.templates import TEMPLATE_HELP, LabelError, Template, parse_template

__all__ = [
    "TEMPLATE_HELP",
    "LabelError",
    "Plan",
    "Status",
    "Study",
    "StudyPlan",
    "StudySet",
    "Template",
    "build_plan",
    "find_studies",
    "format_duration",
    "is_plan_file",
    "parse_duration",
    "parse_template",
    "read_plan",
    "write_plan",
]

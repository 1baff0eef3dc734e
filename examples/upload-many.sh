#!/usr/bin/env bash
# Upload many session folders, one after another, into one project: a shell loop over
# `xio upload-dicom`, kept as the baseline that `xio upload-many` is measured against
# (docs/performance.md). For real work use `xio upload-many ROOT --project P`, which groups files
# by study wherever they lie, names sessions from the DICOM headers, sends several studies at once
# under one cap on requests, and remembers what it sent (docs/upload-many.md).
#
#   examples/upload-many.sh MYPROJECT /data/exports/*/
#
# Each folder's name is used as both subject and session label (adapt the two lines below to your
# naming). Failures do not stop the loop; a summary at the end lists them, and the exit code is 1
# if any session failed. Credentials come from XNAT_SERVER / XNAT_USERNAME / XNAT_PASSWORD.
set -uo pipefail

project=${1:?usage: upload-many.sh PROJECT DIR...}
shift
failed=()
for dir in "$@"; do
  name=$(basename "$dir")
  subject=$name
  session="${name}_MR1"
  echo "== $dir -> $project/$subject/$session"
  if ! xio upload-dicom "$project" "$subject" "$session" "$dir"; then
    failed+=("$dir")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
echo "all ${#} sessions uploaded"

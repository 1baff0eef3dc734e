#!/usr/bin/env bash
# Nightly upload from an acquisition workstation, for cron.
#
#   # crontab -e  (every night at 01:30)
#   30 1 * * *  /opt/xnatio/cron-upload.sh /data/outbox >> /var/log/xnatio/cron.log 2>&1
#
# Each folder under OUTBOX is one session, named PROJECT__SUBJECT__SESSION. A folder that uploads
# and verifies cleanly is moved to OUTBOX/.done; one that fails stays and is retried next night
# (xio resumes: only what the server has not confirmed is sent again).
#
# Credentials: put XNAT_SERVER, XNAT_USERNAME and XNAT_PASSWORD (or XNAT_TOKEN=alias:secret) in
# a file readable only by the cron user, e.g. /etc/xnatio/env (chmod 600), not in the crontab.
set -uo pipefail

OUTBOX=${1:?usage: cron-upload.sh OUTBOX}
ENV_FILE=${XNATIO_ENV_FILE:-/etc/xnatio/env}
LOG_DIR=${XNATIO_LOG_DIR:-/var/log/xnatio}
LOCK=${XNATIO_LOCK:-/tmp/xnatio-cron.lock}

mkdir -p "$LOG_DIR" "$OUTBOX/.done"

# One run at a time: a night that overruns must not start a second upload of the same folders.
exec 9>"$LOCK"
if ! flock -n 9; then
  echo "$(date -Is) another upload run holds $LOCK; exiting"
  exit 0
fi

# Credentials into this script's environment only (never on the command line: ps shows it).
if [ -r "$ENV_FILE" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$ENV_FILE"
  set +a
fi

status=0
for dir in "$OUTBOX"/*/; do
  [ -d "$dir" ] || continue
  name=$(basename "$dir")
  project=${name%%__*}
  rest=${name#*__}
  subject=${rest%%__*}
  session=${rest#*__}
  if [ "$project" = "$name" ] || [ "$subject" = "$rest" ] || [ -z "$session" ]; then
    echo "$(date -Is) skipping $name: expected PROJECT__SUBJECT__SESSION"
    continue
  fi
  log="$LOG_DIR/$name.$(date +%Y%m%d-%H%M%S).json"
  # --json: a machine-readable result on stdout (kept per session); progress lines go to stderr.
  xio upload-dicom "$project" "$subject" "$session" "$dir" --json >"$log"
  rc=$?
  case $rc in
    0) echo "$(date -Is) $name: uploaded and verified"; mv "$dir" "$OUTBOX/.done/" ;;
    1) echo "$(date -Is) $name: some files failed, see $log; will retry next run"; status=1 ;;
    2) echo "$(date -Is) $name: usage or configuration error (rc=2), see above"; status=2 ;;
    3) echo "$(date -Is) authentication failed (rc=3): check $ENV_FILE"; exit 3 ;;
    4) echo "$(date -Is) server unreachable (rc=4): stopping, will retry next run"; exit 4 ;;
    *) echo "$(date -Is) $name: interrupted or unexpected exit $rc"; status=$rc ;;
  esac
done
exit $status

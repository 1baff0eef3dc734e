#!/usr/bin/env bash
# Every 15 minutes from cron: send each settled study of an outbox to XNAT, once.
#
#   # crontab -e
#   */15 * * * *  /opt/xnatio/upload-many-cron.sh /data/outbox MYPROJ >> /var/log/xnatio/upload-many.log 2>&1
#
# `xio upload-many` remembers every study in its state folder (a rerun sends only new or
# unfinished studies), leaves studies still being written for a later run (--settle), retries a
# failed study on later runs and quarantines it after 3 failed runs. Two overlapping runs never
# both send: the second exits at once (its run lock), which this script reports as a skip.
#
# Credentials: XNAT_SERVER, XNAT_USERNAME and XNAT_PASSWORD (or a token saved by
# `xio login --save-token`) in a file readable only by the cron user, never in the crontab.
set -uo pipefail

OUTBOX=${1:?usage: upload-many-cron.sh OUTBOX PROJECT}
PROJECT=${2:?usage: upload-many-cron.sh OUTBOX PROJECT}
ENV_FILE=${XNATIO_ENV_FILE:-/etc/xnatio/env}
SENT=${XNATIO_SENT_DIR:-}

if [ -r "$ENV_FILE" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$ENV_FILE"
  set +a
fi

after=(--after keep)
if [ -n "$SENT" ]; then
  after=(--after "move:$SENT")   # verified studies move out of the outbox
fi

xio upload-many "$OUTBOX" --project "$PROJECT" --settle 10m "${after[@]}"
code=$?
case $code in
  0) ;;                                                       # every study verified or waiting
  1) echo "$(date -Is) some studies failed: see \`xio status\`" ;;  # cron mails this line
  2) echo "$(date -Is) configuration error, or another run is still going (exit 2)" ;;
  *) echo "$(date -Is) xio upload-many exited $code" ;;
esac
exit $code

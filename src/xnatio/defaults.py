"""Every default of an upload, in one place: the CLI options, the Python API, the pipeline's
:class:`~xnatio.pipeline.UploadOptions` and the REST target all refer to these names.

The REST figures come from the seed's measurements (42 parallel batches against a real server,
docs/performance.md); C-STORE gets one association per batch, 45 of them.
"""

from __future__ import annotations

REST_BATCHES = 42
DICOM_STORE_BATCHES = 45
BATCHES = {"rest": REST_BATCHES, "dicom-store": DICOM_STORE_BATCHES}
UPLOAD_WORKERS = 42  # REST requests in flight
ARCHIVE_WORKERS = 5  # REST batches packed ahead of sending
ARCHIVE_FORMAT = "tar"
REQUEST_TIMEOUT = 10800.0  # seconds per REST request (a large batch takes long to import)
OVERWRITE = "none"
ARCHIVE_WAIT = 900.0  # seconds to wait for Direct-Archive's experiment (facts 1.6)
# Retrying a request stops at whichever comes first: RETRIES further attempts (`--retries`, a
# cap per batch, request or association) or RETRY_BUDGET seconds since its first failure
# (`--retry-budget`): longer than a Tomcat restart (a minute or more), so an XNAT restarted
# mid-upload costs a wait, not a failed run.
RETRIES = 30
RETRY_BUDGET = 180.0
# xio upload-many (xnatio.many): studies sent at once, the one cap on REST requests in flight to
# the server whatever the number of studies, failed runs before a study is quarantined, the
# backoff before a failed study is tried again (doubling per failed run, capped), the --watch
# rescan interval (seconds) and what happens to a verified study's source files.
MANY_PARALLEL_STUDIES = 4
MANY_MAX_REQUESTS = UPLOAD_WORKERS
MANY_MAX_ATTEMPTS = 3
MANY_RETRY_BACKOFF = 300.0
MANY_RETRY_BACKOFF_MAX = 6 * 3600.0
MANY_WATCH_INTERVAL = 60.0
MANY_AFTER = "keep"
# send_dicom_store()'s own default, documented in docs/api-reference.md (the CLI passes RETRIES).
DICOM_STORE_API_RETRIES = 3
# C-STORE association knobs (seconds; 0 = none) and the largest PDU we accept (0 = no limit).
MAX_PDU = 0
ACSE_TIMEOUT = 30.0
DIMSE_TIMEOUT = 60.0
NETWORK_TIMEOUT = 60.0
# C-STORE peer: XNAT's DICOM receiver listens on 8104 with AE title "XNAT" in a stock install;
# "XNATIO" is the title we call from.
DICOM_PORT = 8104
CALLED_AET = "XNAT"
CALLING_AET = "XNATIO"
# How many per-file C-STORE errors a failed run lists before summarising the rest.
MAX_ERROR_LINES = 20
LOG_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal
# The rate (MB/s) and ETA of the progress display: bytes over the last RATE_WINDOW seconds.
RATE_WINDOW = 10.0

# upload-many (xnatio.many). Subject: the PatientID, the field research sites put their subject
# ID in (the Patient Name XNAT itself falls back to, facts 1.2, identifies the patient and is
# often "Last^First"). Session: xnat-ingest's {PatientID}_{StudyDate} naming plus the Modality,
# so a patient's follow-ups and a same-day PET and MR get distinct sessions; two studies that
# still share a label wait in the plan as errors.
MANY_SUBJECT_TEMPLATE = "{PatientID}"
MANY_SESSION_TEMPLATE = "{PatientID}_{StudyDate}_{Modality}"
# Seconds a study's newest file must be left alone before it is sent: scanner and PACS exports
# pause between series for minutes; XNAT's own receiver waits 5 minutes of quiet before it builds
# a session (facts 3.2). Ten minutes leaves a margin over that for a cron job.
MANY_SETTLE = 600.0
# --compress (xnatio.compress): "auto" deflates the entries of a batch's zip while the link is
# slower than one core deflates. The link's rate is what the server's side acknowledged; the first
# decision is taken from the COMPRESS_PROBE seconds that follow COMPRESS_WARMUP seconds of sending
# (connections opening, TCP slow start); rates of the files' bytes are taken over COMPRESS_WINDOW;
# one entry is deflated every COMPRESS_SAMPLE_INTERVAL seconds to keep the compressor's rate
# measured, and data that shrink less than COMPRESS_MIN_RATIO go stored. While auto measures, each
# body's socket queues at most COMPRESS_UNSENT bytes it has not sent yet (TCP_NOTSENT_LOWAT), so
# stored bytes do not pile up in send buffers ahead of a slow link. zlib level 1: on the benchmark
# data level 6 shrinks no more for several times the CPU (docs/performance.md, "Compression").
COMPRESS = "auto"
COMPRESS_LEVEL = 1
COMPRESS_MARGIN = 1.5
COMPRESS_WINDOW = 1.0
COMPRESS_WARMUP = 0.25
COMPRESS_PROBE = 0.5
COMPRESS_SAMPLE_INTERVAL = 2.0
COMPRESS_MIN_RATIO = 1.2
COMPRESS_UNSENT = 64 * 1024
# auto's trials: seconds a choice (deflate or store) runs before its payload rate (over the last
# COMPRESS_WINDOW) is compared with the other's, how much faster deflating must be to be kept,
# and seconds before deflating is tried again after a trial that lost.
COMPRESS_TRIAL = 2.0
COMPRESS_RETRY = 10.0
COMPRESS_GAIN = 1.15
# glibc malloc arenas the client may use (xnatio.malloc): 42 sender threads in up to 16 arenas
# kept 30 MB of freed memory at 100,000 files (docs/performance.md, "rss").
MALLOC_ARENAS = 2
# Read-back (xnatio.verify): the scans' file listings requested at once, reduced in order, so that
# verifying costs about one round trip more than the upload, not one per scan; fewer when the
# scans are large, so that about VERIFY_LISTING_FILES files' listings are held at once.
VERIFY_LISTINGS = 4
VERIFY_LISTING_FILES = 2000
# Blocks this large or larger are mmap'd and unmapped when freed (xnatio.malloc): the request
# bodies' 256 KB chunks no longer fragment the arenas (glibc's own threshold climbs to 32 MB).
MALLOC_MMAP_THRESHOLD = 128 * 1024
# Pre-flight (xnatio.preflight): its reads of the project (subjects, the two create permissions,
# each session label) requested at once, judged in order: one round trip instead of four or more.
PREFLIGHT_READS = 4

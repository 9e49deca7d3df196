#!/usr/bin/env bash
# A deployment from start to finish on the embedded system. Run it from the checkout (beside ../shared/data)
# with the environment active (`tox -e lfr -- --help` once, then `. .tox/shared/bin/activate`):
#     bash docs/walkthrough.sh
# docs/deployments-and-governance.md shows this file as it is, and the test suite runs it as it is
# (tests/e2e/test_newcomer_walkthrough.py).
set -euo pipefail
DATA=${LFR_DATA_DIR:-../shared/data}          # the faces and the video used below
WORK=${WALKTHROUGH_DIR:-./state/walkthrough}  # this walkthrough's files: the system's state, its log, images, report
rm -rf "$WORK/state" && mkdir -p "$WORK"      # a fresh system each time
export LFR_STATE_DIR=$WORK/state              # every lfr command below finds the running system through it

# 1. Start the embedded system (nats-server, Qdrant local mode, the services) in the background; it stops when
#    this script ends. `lfr status --wait` returns once every service is SERVING (about a minute: models load).
lfr up --state-dir "$LFR_STATE_DIR" > "$WORK/lfr-up.log" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null; wait $UP' EXIT
lfr status --wait 300

# Who acts is named with --as: a user of the system's development identity provider (`lfr status` needs
# nobody). builder builds watchlists; inspector and superintendent authorise them; sergeant may do both, but
# never for one list; operator runs deployments and handles alerts; auditor audits; public reads the records.
lfr policy show --as public

# 2. Create a deployment and build its watchlist (each image passes the policy's quality gate or is refused with
#    its reason: two photos below are older than the policy's max_image_age_days).
ID=$(lfr deployment create --name "Queen Street, Saturday" --site "Queen Street, Cardiff" \
       --start now --end +4h --camera cam-1 --purpose "locate people wanted on warrant" \
       --as sergeant --id-only)
lfr watchlist import --deployment "$ID" --category wanted-by-police --source "custody system" \
    --legal-basis "PACE 1984 s.64A" --as sergeant "$DATA/faces/knn_examples/train"
lfr watchlist add --deployment "$ID" --subject lin-manuel-miranda --category wanted-by-court \
    --source "custody system" --legal-basis "PACE 1984 s.64A" --as sergeant "$DATA/faces/misc/lin-manuel-miranda.png"
lfr watchlist show --deployment "$ID" --as sergeant

# 3. Authorise it. Separation of duties: whoever built the list cannot authorise it (PERMISSION_DENIED, exit 1).
if lfr deployment authorise "$ID" --as sergeant; then
    echo "the builder of the list authorised it: separation of duties is broken" >&2
    exit 1
fi
lfr deployment authorise "$ID" --as inspector     # AUTHORISED: the digest of this exact list is stored

# 4. Start it and stream a camera: ingest pulls the video file for cam-1 (an rtsp:// URL works the same way).
lfr deployment start "$ID" --as operator
lfr source start --deployment "$ID" --camera cam-1 --as operator "$DATA/video/stage-audience-360p30.mp4"

# 5. Watch the alerts arrive for 30 s, while the 9 s video plays (without --seconds: until Ctrl-C).
lfr alerts watch "$ID" --from-start --seconds 30 --no-bell --as operator

# 6. Review the first alert (the probe crop beside the enrolled image, written to files) and adjudicate it.
ALERT=$(lfr alerts list "$ID" --pending --ids --as operator | sed -n 1p)
lfr alerts show "$ALERT" --probe "$WORK/probe.jpg" --reference "$WORK/reference.jpg" --as operator
lfr alerts adjudicate "$ALERT" --outcome confirmed --engagement other --note "spoke to him; identity confirmed" \
    --as operator
lfr deployment stats "$ID" --as operator

# 7. End it: the watchlist's vectors and images are purged at once; the nominal ids stay for the record.
lfr deployment end "$ID" --as operator
lfr watchlist show --deployment "$ID" --as inspector

# 8. The published record of this deployment, the period's records as a web page anyone may publish, and the
#    audit chain they are computed from.
lfr report deployment "$ID" --as inspector
lfr report deployments --from today --format html --out "$WORK/deployments.html" --as public
lfr report totals --from today --as public
lfr audit verify --as auditor

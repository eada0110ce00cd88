# Sourced by the bench scripts (needs $here and $OUTRIDER_BIN): the OUR_*
# variables that make outrider a contender of the shared bench, driven
# only through its placeholder interface by bench/outrider-contender.sh.
ours_args="{MODE} {LISTEN_ADDR} {UPSTREAM_ADDR} {CERT} {KEY} {CA} {SELF_ID} {PEER_ID} {ADMIN_ADDR} {WORKDIR} {RESUMPTION} {TLS_GROUP}"
export OUR_NAME=outrider
OUR_VERSION="$("$OUTRIDER_BIN" --version)"
export OUR_VERSION
export OUR_OUTBOUND_CMD="$here/outrider-contender.sh outbound $ours_args"
export OUR_INBOUND_CMD="$here/outrider-contender.sh inbound $ours_args"

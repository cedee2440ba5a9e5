#!/usr/bin/env bash
# stratus-upgrade.sh — zero-downtime binary upgrade of the node run by stratus.service.
#
# Usage (as root):  stratus-upgrade.sh [/path/to/new/stratus]
#   With a path, installs it as /usr/local/bin/stratus first; without, upgrades to the binary
#   already there. Env: STRATUS_CONFIG (default /etc/stratus/stratus.toml), STRATUS_DRAIN_WAIT
#   (seconds to wait for an old process to drain and exit, default 90).
#
# The mechanism is Pingora's: a new process started with `stratus run --upgrade` opens the
# upgrade socket (/tmp/stratus-<node.name>-upgrade.sock) and waits ~5 s for the listening
# sockets; SIGQUIT makes the old process send them over it, keep accepting 5 s more, then
# drain its in-flight requests and exit. Both processes share the same kernel sockets, so no
# connection is refused. SIGQUIT is sent only once the new process is up and waiting: an old
# process that gets SIGQUIT with nobody to take the sockets still shuts down.
#
# systemd tracks one main process per unit, and a unit cannot be started while it runs, so the
# node passes through a transient unit and back, ending under stratus.service with the new
# binary:  stratus.service --SIGQUIT--> stratus-upgrade-bridge.service --SIGQUIT--> stratus.service
# If the second hop fails the node keeps serving from the bridge unit; fix and run this again
# (it resumes at the second hop).
set -euo pipefail

UNIT=stratus.service
BRIDGE=stratus-upgrade-bridge.service
BIN=/usr/local/bin/stratus
CONFIG=${STRATUS_CONFIG:-/etc/stratus/stratus.toml}
DRAIN_WAIT=${STRATUS_DRAIN_WAIT:-90}
ENV_FILE=/run/stratus-upgrade.env   # read by stratus.service: STRATUS_RUN_FLAGS=--upgrade

log() { printf 'stratus-upgrade: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# A string value of [node] KEY from the config (stratus's own parser is not exposed; this
# reads the simple `key = "value"` form used for node.name and node.admin_listen).
node_key() {
  awk -v key="$1" '
    /^[ \t]*\[/ { in_node = ($0 ~ /^[ \t]*\[node\][ \t]*(#.*)?$/); next }
    in_node && $0 ~ ("^[ \t]*" key "[ \t]*=") && match($0, /"[^"]*"/) {
      print substr($0, RSTART + 1, RLENGTH - 2); exit
    }' "$CONFIG"
}

# Wait until the new process has bound the upgrade socket (it then waits for the sockets).
wait_for_upgrade_socket() {
  local i
  for i in $(seq 1 40); do
    [[ -S $SOCK ]] && return 0
    sleep 0.1
  done
  return 1
}

# Wait until process $1 has exited (drained), at most DRAIN_WAIT seconds.
wait_for_exit() {
  local pid=$1 i
  for ((i = 0; i < DRAIN_WAIT; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 1
  done
  return 1
}

# The node answers on its admin listener (either process, while both hold the sockets).
check_health() {
  command -v curl >/dev/null || return 0
  local addr=${ADMIN/0.0.0.0/127.0.0.1}
  addr=${addr/\[::\]/[::1]}
  curl -fsS --max-time 2 -o /dev/null "http://$addr/healthz" || die "GET http://$addr/healthz failed"
}

main_pid() { systemctl show -p MainPID --value "$1"; }

[[ $EUID -eq 0 ]] || die "run as root"
[[ -r $CONFIG ]] || die "cannot read $CONFIG"
NAME=$(node_key name)
ADMIN=$(node_key admin_listen)
[[ -n $NAME ]] || die "no node.name in $CONFIG"
SOCK=/tmp/stratus-$NAME-upgrade.sock

# 1. Install the new binary. The config must pass the new binary's check, as the service user
#    (who must be able to read the secret file). rename(2) is atomic and the running process
#    keeps executing its old inode.
if [[ $# -ge 1 ]]; then
  install -m 0755 -o root -g root "$1" "$BIN.new"
  runuser -u stratus -- "$BIN.new" check --config "$CONFIG" || { rm -f "$BIN.new"; die "the new binary rejects $CONFIG"; }
  mv -f "$BIN.new" "$BIN"
  log "installed $("$BIN" --version)"
else
  runuser -u stratus -- "$BIN" check --config "$CONFIG" || die "$BIN rejects $CONFIG"
fi

# 2. First hop: stratus.service -> transient bridge unit running the new binary.
if systemctl is-active --quiet "$UNIT"; then
  systemctl is-active --quiet "$BRIDGE" && die "$BRIDGE is already running"
  old=$(main_pid "$UNIT")
  [[ $old -gt 0 ]] || die "no main process for $UNIT"
  rm -f "$SOCK"   # the new process binds it afresh; a stale file must not pass the wait below
  log "starting $BRIDGE with --upgrade"
  # The same user, limits and main hardening as stratus.service.
  systemd-run --unit="$BRIDGE" --collect --quiet \
    -p User=stratus -p Group=stratus -p LimitNOFILE=65536 \
    -p KillSignal=SIGTERM -p TimeoutStopSec=40 \
    -p NoNewPrivileges=yes -p ProtectSystem=strict -p ProtectHome=yes -p ReadWritePaths=/tmp \
    -p AmbientCapabilities=CAP_NET_BIND_SERVICE -p CapabilityBoundingSet=CAP_NET_BIND_SERVICE \
    "$BIN" run --config "$CONFIG" --upgrade
  wait_for_upgrade_socket || { systemctl stop "$BRIDGE" || true; die "$BRIDGE did not open $SOCK; old process left serving"; }
  log "SIGQUIT to old process $old: hands its sockets over and drains"
  kill -QUIT "$old"
  sleep 2
  systemctl is-active --quiet "$BRIDGE" || die "$BRIDGE died after the hand-over; see journalctl -u $BRIDGE"
  check_health
  log "waiting up to ${DRAIN_WAIT}s for the old process to drain"
  wait_for_exit "$old" || die "old process $old still running after ${DRAIN_WAIT}s"
  # It exited 0 on its own: Restart=on-failure leaves the unit inactive.
fi

# 3. Second hop: bridge -> stratus.service (new binary), so systemd manages the node again.
systemctl is-active --quiet "$BRIDGE" || die "neither $UNIT nor $BRIDGE is running"
systemctl is-active --quiet "$UNIT" && die "$UNIT and $BRIDGE both running; inspect before going on"
bridge=$(main_pid "$BRIDGE")
rm -f "$SOCK"
trap 'rm -f "$ENV_FILE"' EXIT
echo 'STRATUS_RUN_FLAGS=--upgrade' >"$ENV_FILE"
log "starting $UNIT with --upgrade"
systemctl start "$UNIT"   # Type=exec: returns once `stratus run` is exec'd
rm -f "$ENV_FILE"         # any later (re)start of the unit binds its sockets normally
wait_for_upgrade_socket || { systemctl stop "$UNIT" || true; die "$UNIT did not open $SOCK; the node keeps serving from $BRIDGE"; }
log "SIGQUIT to bridge process $bridge"
kill -QUIT "$bridge"
sleep 2
systemctl is-active --quiet "$UNIT" || die "$UNIT died after the hand-over; see journalctl -u $UNIT"
check_health
log "waiting up to ${DRAIN_WAIT}s for the bridge to drain"
wait_for_exit "$bridge" || die "bridge process $bridge still running after ${DRAIN_WAIT}s"
log "done: $UNIT runs $("$BIN" --version)"

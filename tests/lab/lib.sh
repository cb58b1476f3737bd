# shellcheck shell=bash
# Sourced by tests/lab/up, down, demo and check: where the lab lives, and how to
# find, ask and stop its three vmgated daemons.
#
# The lab's folder (VMGATE_LAB_DIR, default /tmp/vmgate-lab):
#   .vmgate-lab          marker: the folder was made by tests/lab/up (down --purge checks it)
#   env                  the export lines up printed
#   domain.started       present when up started the test domain itself: its folder
#   hvN/vmgated.toml     hvN's configuration (the CLI's `--host hvN` reads it)
#   hvN/hvN.keytab       hvN$'s keys with its HOST and migration SPNs (0600)
#   hvN/state/           hvN's state folder (0700): events.jsonl, tickets, `vmgate host set` settings
#   hvN/vms/             hvN's storage root
#   hvN/vmgated.sock     hvN's control socket
#   hvN/vmgated.log      the daemon's stderr (its events as text)
#   hvN/pid              the daemon's PID while it runs
#   demo/                what tests/lab/demo writes (alice's ticket cache, VM files, JSON)
#   check/               what tests/lab/check writes (its ticket cache, VM files, outputs)
#   accounts.log         what the vmgate delegation commands of up printed
#   exportkeytab.log     what exporting the keytabs printed

# The three hosts; hvN listens on 127.0.0.1N (the addresses the domain's DNS gives them).
# shellcheck disable=SC2034 # used by the scripts that source this file
LAB_HOSTS=(hv1 hv2 hv3)

# lab_ip HOST: hv1 -> 127.0.0.11.
lab_ip() {
    printf '127.0.0.1%s\n' "${1#hv}"
}

# lab_dir: prints the lab's folder (VMGATE_LAB_DIR, absolute, normalised) or fails.
lab_dir() {
    local dir=${VMGATE_LAB_DIR:-/tmp/vmgate-lab}
    if [[ $dir != /* ]]; then
        printf "VMGATE_LAB_DIR='%s' must be an absolute path\n" "$dir" >&2
        return 1
    fi
    dir=$(realpath -m -- "$dir")
    if [[ $dir == / || $(dirname -- "$dir") == / ]]; then
        printf "VMGATE_LAB_DIR='%s' is too close to / for a lab folder\n" "$dir" >&2
        return 1
    fi
    printf '%s\n' "$dir"
}

# lab_port: prints the gateway port (VMGATE_LAB_PORT, default 6600, Hyper-V's) or fails.
lab_port() {
    local port=${VMGATE_LAB_PORT:-6600}
    if ! [[ $port =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then
        printf "VMGATE_LAB_PORT='%s' is not a TCP port number\n" "$port" >&2
        return 1
    fi
    printf '%s\n' "$port"
}

# q VALUE: VALUE as one single-quoted shell word.
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# proc_alive PID: true while the process exists and is not a zombie.
proc_alive() {
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [[ -n $stat && ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

# daemon_pid LAB_DIR HOST: prints the PID of HOST's vmgated if it runs. Only a process proven
# to be that daemon counts: the PID from HOST/pid, alive, running a binary named vmgated (also
# when the binary was rebuilt since: "vmgated (deleted)"), with `--config LAB_DIR/HOST/vmgated.toml`
# on its command line.
daemon_pid() {
    local dir=$1 host=$2 pid exe args
    [[ -r $dir/$host/pid ]] || return 1
    read -r pid <"$dir/$host/pid" || return 1
    [[ $pid =~ ^[1-9][0-9]*$ ]] || return 1
    proc_alive "$pid" || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    exe=${exe% (deleted)}
    [[ ${exe##*/} == vmgated ]] || return 1
    mapfile -d '' args 2>/dev/null <"/proc/$pid/cmdline" || return 1
    [[ $'\n'"$(printf '%s\n' "${args[@]}")"$'\n' == *$'\n--config\n'"$dir/$host/vmgated.toml"$'\n'* ]] \
        || return 1
    printf '%s\n' "$pid"
}

# daemon_binary_replaced PID: true when the daemon's binary was replaced (rebuilt) since it
# started.
daemon_binary_replaced() {
    local exe
    exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
    [[ $exe == *' (deleted)' ]]
}

# stop_daemon LAB_DIR HOST: SIGTERM to HOST's daemon, up to 15 s for it to end (it stops its
# VMs first), then SIGKILL. Removes HOST/pid. Prints what it did on stderr; returns 1 if the
# daemon survived.
stop_daemon() {
    local dir=$1 host=$2 pid deadline
    if ! pid=$(daemon_pid "$dir" "$host"); then
        rm -f -- "$dir/$host/pid"
        return 0
    fi
    printf 'lab: stopping vmgated of %s (pid %s)\n' "$host" "$pid" >&2
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 15))
    while proc_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    if proc_alive "$pid"; then
        printf 'lab: vmgated of %s did not stop within 15 s: SIGKILL\n' "$host" >&2
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 5))
        while proc_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
        if proc_alive "$pid"; then
            printf 'lab: could not stop vmgated of %s (pid %s)\n' "$host" "$pid" >&2
            return 1
        fi
    fi
    rm -f -- "$dir/$host/pid"
}

# control_call SOCKET JSON: sends one request line to a control socket and prints the final
# answer line (progress lines are skipped). Fails when nothing answers within 10 s.
control_call() {
    /usr/bin/python3 - "$1" "$2" <<'PY'
import json, socket, sys

sock, request = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sock)
    s.sendall(request.encode() + b"\n")
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(1)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if json.loads(line).get("result") != "progress":
                print(line.decode())
                sys.exit(0)
except (OSError, ValueError, AttributeError):
    sys.exit(1)
PY
}

# shellcheck shell=bash
# Sourced by tests/domain/up, tests/domain/down and tests/run: Debian packages with an
# idempotent installer, and how to find and stop the DC of a folder.

# What the test domain needs (samba-ad-provision must be named with --no-install-recommends;
# libsasl2-modules-gssapi-mit makes `ldapsearch -Y GSSAPI` work).
# shellcheck disable=SC2034 # used by the scripts that source this file
DOMAIN_PACKAGES=(samba samba-ad-dc samba-ad-provision samba-dsdb-modules samba-vfs-modules
    winbind krb5-user ldap-utils libsasl2-modules-gssapi-mit ldb-tools faketime openssl
    iproute2)

# missing_packages NAME...: prints the ones that are not installed, one a line.
missing_packages() {
    local installed p
    installed=$(dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null) || true
    for p in "$@"; do
        [[ $'\n'$installed$'\n' == *$'\n'"$p install ok installed"$'\n'* ]] || printf '%s\n' "$p"
    done
}

# install_packages [--optional] NAME...: installs the missing ones (apt-get update only then;
# one retry). apt may never remove an installed package for them (--no-remove): with
# --optional, packages that cannot be installed that way are skipped with a warning instead of
# failing. Progress goes to stderr.
install_packages() {
    local missing attempt optional=0
    if [[ ${1:-} == --optional ]]; then
        optional=1
        shift
    fi
    mapfile -t missing < <(missing_packages "$@")
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        printf 'packages: %s missing and not root: cannot install them\n' "${missing[*]}" >&2
        return 1
    fi
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        # Keep maintainer scripts from starting smbd/nmbd/samba with the default config (it
        # would listen on every interface).
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
    fi
    local simulated
    if ((optional)); then
        simulated=$(apt-get install -s -qq --no-remove --no-install-recommends "${missing[@]}" 2>&1) || true
    fi
    if ((optional)) && [[ $simulated == *'remove is disabled'* ]]; then
        # Known from the current package lists already: no need for apt-get update.
        printf 'packages: warning: skipping %s (apt would remove installed packages for it)\n' \
            "${missing[*]}" >&2
        return 0
    fi
    printf 'packages: installing %s\n' "${missing[*]}" >&2
    for attempt in 1 2; do
        if DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove \
                --no-install-recommends "${missing[@]}" >&2; then
            return 0
        fi
        printf 'packages: apt-get failed (attempt %d of 2)\n' "$attempt" >&2
        ((!optional)) || break
        sleep 2
    done
    if ((optional)); then
        printf 'packages: warning: skipping %s (apt cannot install it without removing other packages, or failed)\n' \
            "${missing[*]}" >&2
        return 0
    fi
    printf 'packages: could not install %s\n' "${missing[*]}" >&2
    return 1
}

# ---------------------------------------------------------------------------------------------
# The DC of a folder. Only processes that can be proven to belong to it are ever signalled: the
# `samba` whose stdout is the folder's samba.log (its PID is in samba.pid and is also its
# process group), the members of that group, and the smbd/winbindd it starts (they make their
# own sessions, but their command line names the folder's smb.conf).

# alive PID: true while the process exists and is not a zombie.
alive() {
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [[ -n $stat && ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

# dc_pid DIR: prints the PID of the DC running from DIR, if there is one.
dc_pid() {
    local dir=$1 pid
    [[ -r $dir/samba.pid ]] || return 1
    read -r pid <"$dir/samba.pid" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # samba rewrites its command line; its stdout still names this folder's log.
    [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */samba ]] || return 1
    [[ $(readlink "/proc/$pid/fd/1" 2>/dev/null) == "$dir/samba.log" ]] || return 1
    alive "$pid" || return 1
    printf '%s\n' "$pid"
}

# dc_processes DIR [PGID]: prints the live processes of the DC of DIR.
dc_processes() {
    local dir=$1 pgid=${2:-} proc stat comm state group args
    for proc in /proc/[0-9]*; do
        read -r stat 2>/dev/null <"$proc/stat" || continue
        comm=${stat#*\(}
        comm=${comm%\)*}
        stat=${stat##*) }
        read -r state _ group _ <<<"$stat"
        [[ $state == Z || $state == X ]] && continue
        if [[ -n $pgid && $group == "$pgid" ]]; then
            printf '%s\n' "${proc#/proc/}"
        elif [[ $comm == smbd || $comm == winbindd || $comm == samba ]]; then
            mapfile -d "" args 2>/dev/null <"$proc/cmdline" || continue
            if [[ " ${args[*]} " == *" --configfile=$dir/etc/smb.conf "* ]]; then
                printf '%s\n' "${proc#/proc/}"
            fi
        fi
    done
}

# stop_dc DIR: SIGTERM to the DC, up to 10 s for all its processes to end, then SIGKILL to the
# rest, up to 5 s more. Prints what it did on stderr; returns 1 if something survived.
stop_dc() {
    local dir=$1 pid deadline left=()
    pid=$(dc_pid "$dir") || pid=
    deadline=$((SECONDS + 10))
    if [[ -n $pid ]]; then
        printf 'domain: stopping the DC running from %s (pid %s)\n' "$dir" "$pid" >&2
        kill -TERM "$pid" 2>/dev/null || true
        while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    fi
    while :; do
        mapfile -t left < <(dc_processes "$dir" "$pid")
        ((${#left[@]})) || return 0
        if [[ -z $pid ]] || ((SECONDS >= deadline)); then break; fi
        sleep 0.2
    done
    printf 'domain: killing %d leftover process(es) of the DC of %s\n' "${#left[@]}" "$dir" >&2
    kill -KILL "${left[@]}" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while :; do
        mapfile -t left < <(dc_processes "$dir" "$pid")
        ((${#left[@]})) || return 0
        ((SECONDS < deadline)) || break
        sleep 0.2
    done
    printf 'domain: could not stop processes %s of the DC of %s\n' "${left[*]}" "$dir" >&2
    return 1
}

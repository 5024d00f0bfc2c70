#!/usr/bin/env bash
# Runs N local processes of one kforcing_jax command, as N "hosts" of a
# multi-host job, each with its own fake CPU devices. For testing multi-host
# code paths (jax.distributed, per-process data, global arrays) on one machine.
#
# Usage:
#   launch/local_multiprocess.sh [options] [--] SUBCOMMAND [kforcing_jax flags]
#
# Options:
#   -n, --num-processes N   processes to start (default 2)
#   -d, --devices D         fake CPU devices per process (default 4)
#   -p, --port PORT         coordinator port on 127.0.0.1 (default: a free one)
#   -t, --timeout SECONDS   stop everything after this long (default 1800)
#   -g, --grace SECONDS     on a timeout or Ctrl-C, how long the processes
#                           get to save and exit after SIGTERM before SIGKILL
#                           (default 300): a multi-process run stops (and
#                           saves) only at its next train.log_every step; a
#                           second Ctrl-C kills at once. After one process
#                           fails the others cannot save, and get 5 s.
#   --dry-run               print each process's command with its env; run
#                           nothing
#   -h, --help              this help
#
# Each process i gets:
#   KFORCING_COORDINATOR=127.0.0.1:PORT  KFORCING_NUM_PROCESSES=N
#   KFORCING_PROCESS_ID=i  JAX_PLATFORMS=cpu
#   XLA_FLAGS=--xla_force_host_platform_device_count=D (plus the other
#             inherited XLA_FLAGS)
#   PYTHONPATH=<this repository>:$PYTHONPATH
# and runs `$PYTHON -m kforcing_jax ...` (PYTHON defaults to python3) in the
# current directory. kforcing_jax.sharding.maybe_initialize_distributed()
# reads the KFORCING_* variables. Every output line is prefixed with [pI].
# If any process fails, the others are stopped and the script exits with the
# failing status; on timeout it exits with 124, after the grace period. A
# process that exits 143 (stopped by a SIGTERM; in training, after saving)
# is not a failure: the others get the grace period to stop and save too,
# and the script then exits 143, as it does on a SIGTERM of its own.
#
# Example:
#   launch/local_multiprocess.sh -n 2 -- train-teacher \
#       --config=configs/tiny.py --workdir=/tmp/kf_mp

# mapfile and associative arrays are bash 4 (macOS ships 3.2 as /bin/bash).
# POSIX syntax, before `set`: under sh, dash or zsh it must still refuse.
if [ "${BASH_VERSINFO:-0}" -lt 4 ] 2>/dev/null; then
  shell_version="${BASH_VERSION:-not bash}"
  echo "error: this script needs bash >= 4 (this shell: $shell_version); on" \
    "macOS: brew install bash, then run it as 'bash $0 ...'" >&2
  exit 2
fi

# The cleanup functions run from traps, which shellcheck cannot see.
# shellcheck disable=SC2317
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
PYTHON="${PYTHON:-python3}"

usage() {
  # The header comment above, without the leading '# '.
  sed -n '2,/^$/{s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
}

die_usage() {
  echo "error: $*" >&2
  echo "run '$0 --help' for usage" >&2
  exit 2
}

# check_int FLAG VALUE MIN MAX: exits 2 unless MIN <= VALUE <= MAX.
check_int() {
  # No leading zero: bash arithmetic would read 010 as octal (8); at most
  # 18 digits: a longer number wraps in bash's 64-bit arithmetic.
  if ! [[ "$2" =~ ^[1-9][0-9]{0,17}$|^0$ ]] || (($2 < $3 || $2 > $4)); then
    die_usage "$1 must be an integer in [$3, $4], got '$2'"
  fi
}

num_processes=2
devices=4
port=''
timeout_s=1800
grace_s=300
dry_run=0

# ---------------------------------------------------------------- arguments
while (($#)); do
  case "$1" in
    -n|--num-processes) (($# >= 2)) || die_usage "$1 needs a value"
      num_processes="$2"; shift 2 ;;
    -d|--devices) (($# >= 2)) || die_usage "$1 needs a value"
      devices="$2"; shift 2 ;;
    -p|--port) (($# >= 2)) || die_usage "$1 needs a value"
      port="$2"; shift 2 ;;
    -t|--timeout) (($# >= 2)) || die_usage "$1 needs a value"
      timeout_s="$2"; shift 2 ;;
    -g|--grace) (($# >= 2)) || die_usage "$1 needs a value"
      grace_s="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die_usage "unknown option $1" ;;
    *) break ;;
  esac
done

(($# >= 1)) || die_usage "missing the kforcing_jax command, e.g." \
  "train-teacher --config=configs/tiny.py --workdir=W"
check_int --num-processes "$num_processes" 1 1024
check_int --devices "$devices" 1 1024
check_int --timeout "$timeout_s" 1 604800
check_int --grace "$grace_s" 0 86400
if [[ -n "$port" ]]; then
  check_int --port "$port" 1 65535
else
  # Ask the OS for a free port (a tiny race, fine for local testing).
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

# ---------------------------------------------------------------- commands
# The environment of process $1, as NAME=VALUE words.
process_env() {
  # Keep inherited XLA flags, except an earlier device count.
  local flag xla=''
  local -a inherited
  read -r -a inherited <<< "${XLA_FLAGS:-}"
  for flag in "${inherited[@]}"; do
    [[ "$flag" == --xla_force_host_platform_device_count=* ]] \
      || xla+="$flag "
  done
  xla+="--xla_force_host_platform_device_count=$devices"
  printf '%s\n' \
    "KFORCING_COORDINATOR=127.0.0.1:$port" \
    "KFORCING_NUM_PROCESSES=$num_processes" \
    "KFORCING_PROCESS_ID=$1" \
    "JAX_PLATFORMS=cpu" \
    "XLA_FLAGS=$xla" \
    "PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    mapfile -t env_words < <(process_env "$i")
    # One shell-quoted line per process: env, then the command.
    line="$(printf '%q ' env "${env_words[@]}" "$PYTHON" -m kforcing_jax "$@")"
    echo "${line% }"
  done
  exit 0
fi

# ---------------------------------------------------------------- running
tmp="$(mktemp -d)"
pids=()       # The kforcing_jax processes; each leads its own process group.
prefixers=()  # Their output prefixers.
declare -A finished  # Indices of the processes whose status was collected.

# Signals the process group of every process started (one at a time, by id):
# a process and any children it made. Returns 1 if none is left.
signal_groups() {
  local pid sent=1
  for pid in "${pids[@]}"; do
    if kill -0 -- "-$pid" 2>/dev/null; then
      kill "-$1" -- "-$pid" 2>/dev/null || true
      sent=0
    fi
  done
  return "$sent"
}

# Stops everything still running: TERM, then KILL once $stop_grace seconds
# have passed or at a further INT/TERM. Training saves on TERM, but only at
# its next log_every step when it runs as several processes, so a 5 s grace
# used to kill runs mid-save.
stop_grace=5
force=0
stop_all() {
  local tenths
  signal_groups TERM || return 0
  trap 'force=1' INT TERM
  if ((stop_grace > 5)); then
    echo "[launch] sent SIGTERM; waiting up to ${stop_grace}s for the" \
      "processes to save and exit (Ctrl-C again kills them now)" >&2
  fi
  for ((tenths = 0; tenths < stop_grace * 10 && !force; tenths++)); do
    sleep 0.1
    signal_groups 0 || return 0
  done
  echo "[launch] killing what is left (SIGKILL)" >&2
  signal_groups KILL || true
}

cleanup() {
  local fifo
  stop_all
  # A process stopped before its redirection opened its FIFO leaves the
  # prefixer blocked in open() forever. Opening the FIFO read-write (never
  # blocks on Linux) releases it; with no writer left it then reads EOF.
  for fifo in "$tmp"/out*; do
    [[ -p "$fifo" ]] && { : <> "$fifo"; } 2>/dev/null
  done
  # Let the prefixers print what is left in their pipes.
  for pid in "${prefixers[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
on_int() {
  echo "[launch] interrupted; stopping all processes" >&2
  stop_grace=$grace_s
  exit 130
}
# 143 (128 + SIGTERM), as kforcing_jax exits on SIGTERM: a scheduler that
# restarts failed jobs restarts this one.
on_term() {
  echo "[launch] terminated (SIGTERM); stopping all processes" >&2
  stop_grace=$grace_s
  exit 143
}
# While the processes start, a signal waits until every pid is recorded: a
# process can print before this shell has stored its pid, and one stopped
# then was never signalled (the launcher hung until it ended).
pending=''
trap 'pending=int' INT
trap 'pending=term' TERM

# Copies stdin to stdout with "[pI] " before every line.
prefix_lines() {
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '[p%s] %s\n' "$1" "$line"
  done
}

# Job control: every background job gets its own process group.
set -m
for ((i = 0; i < num_processes; i++)); do
  mkfifo "$tmp/out$i"
  prefix_lines "$i" < "$tmp/out$i" &
  prefixers+=("$!")
  mapfile -t env_words < <(process_env "$i")
  env "${env_words[@]}" "$PYTHON" -m kforcing_jax "$@" > "$tmp/out$i" 2>&1 &
  pids+=("$!")
done
set +m  # Groups are set; no job-status notices from here on.
trap on_int INT
trap on_term TERM
if [[ -n "$pending" ]]; then "on_$pending"; fi
echo "[launch] started $num_processes processes (coordinator 127.0.0.1:$port," \
  "$devices CPU devices each, timeout ${timeout_s}s)" >&2

# Poll until all exit, one fails, or the timeout passes.
status=0
remaining=$num_processes
stopped_by=-1  # SECONDS by which the others must follow a process's 143.
while ((remaining > 0)); do
  for ((i = 0; i < num_processes; i++)); do
    [[ -n "${finished[$i]:-}" ]] && continue
    pid="${pids[$i]}"
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    finished[$i]=1
    remaining=$((remaining - 1))
    if ((rc == 143)); then
      # Stopped by a SIGTERM (kforcing_jax's status for it): in training,
      # after saving, and the others stop at the same step and save their
      # part on their own, so they get the grace period, not 5 s. (Outside
      # training they may instead wait for it in a collective.)
      status=143
      ((stopped_by < 0)) && stopped_by=$((SECONDS + grace_s))
      continue
    fi
    if ((rc != 0)); then
      echo "[launch] process $i failed with exit status $rc; stopping the" \
        "others" >&2
      status=$rc  # The others cannot save without it: stop_grace stays 5.
      break 2
    fi
  done
  if ((stopped_by >= 0 && SECONDS >= stopped_by)); then
    echo "[launch] process(es) still running ${grace_s}s after one was" \
      "stopped by SIGTERM; stopping them" >&2
    break  # They had the grace period: cleanup's TERM gets 5 s.
  fi
  if ((SECONDS >= timeout_s)); then
    echo "[launch] timeout after ${timeout_s}s; stopping all processes" >&2
    status=124
    stop_grace=$grace_s
    break
  fi
  ((remaining > 0)) && sleep 0.2
done
if ((status == 0)); then
  echo "[launch] all $num_processes processes finished" >&2
elif ((status == 143)); then
  echo "[launch] stopped by SIGTERM (training saves first); re-run the" \
    "same command to resume" >&2
fi
exit "$status"

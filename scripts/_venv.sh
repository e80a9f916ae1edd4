# Sourced by scripts/run and scripts/test: make .venv and install the project into it.
ensure_venv() {
    local python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: Python 3.11 or newer is needed; set PYTHON=/path/to/python3.11" >&2
        exit 2
    fi
    if [ ! -x .venv/bin/python ]; then
        "$python" -m venv .venv
    fi
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$1"
}

# The PostgreSQL tests start a private cluster with the Debian `postgresql` package's
# programs. Installed here when missing and running as root (as CI does); otherwise
# the tests that need it fail and say how to install it.
ensure_postgres() {
    if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
        return
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing PostgreSQL (Debian package postgresql) for the PostgreSQL tests"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "warning: PostgreSQL is not installed: the PostgreSQL tests will fail (apt-get install postgresql)" >&2
    fi
}

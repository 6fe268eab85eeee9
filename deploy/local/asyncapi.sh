#!/usr/bin/env bash
# The AsyncAPI project's parser (npm @asyncapi/parser), which the tests use to
# validate schemas/asyncapi.json (tests/unit/test_contracts.py).
#
#   deploy/local/asyncapi.sh install
#       install the Debian packages nodejs and npm when node or npm is missing,
#       then the versions pinned in tests/contracts/package-lock.json into
#       .local/asyncapi (again only when the lock file changed)
#   deploy/local/asyncapi.sh dir
#       print the install directory
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SOURCE_DIR="$REPO/tests/contracts"
INSTALL_DIR="$LOCAL_DIR/asyncapi"
STAMP="$INSTALL_DIR/.installed"

cmd_install() {
    command -v node >/dev/null || apt_install nodejs
    command -v npm >/dev/null || apt_install npm
    command -v node >/dev/null && command -v npm >/dev/null \
        || die "nodejs/npm installed but node or npm is not on PATH"
    if [[ -f $STAMP ]] && cmp -s "$STAMP" "$SOURCE_DIR/package-lock.json"; then
        echo "asyncapi: installed ($INSTALL_DIR, node $(node --version))"
        return 0
    fi
    mkdir -p "$INSTALL_DIR"
    cp "$SOURCE_DIR/package.json" "$SOURCE_DIR/package-lock.json" "$INSTALL_DIR/"
    # --ignore-scripts: nothing from the registry runs at install time.
    (cd "$INSTALL_DIR" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) \
        >"$INSTALL_DIR/npm.log" 2>&1 || die "npm ci failed; see $INSTALL_DIR/npm.log"
    cp "$SOURCE_DIR/package-lock.json" "$STAMP"
    echo "asyncapi: installed ($INSTALL_DIR, node $(node --version))"
}

case "${1:-}" in
    install) cmd_install ;;
    dir) echo "$INSTALL_DIR" ;;
    *) die "usage: $0 {install|dir}" ;;
esac

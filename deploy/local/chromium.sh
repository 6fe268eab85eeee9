#!/usr/bin/env bash
# Headless Chromium and its WebDriver from Debian's packages, for the console's
# browser tests (tests/console/). Nothing here downloads a browser build: the
# tests drive /usr/bin/chromium through /usr/bin/chromedriver, whose versions
# Debian keeps in step.
#
#   deploy/local/chromium.sh install   install `chromium`, `chromium-driver` (and a
#                                      font, for readable screenshots) when missing
#   deploy/local/chromium.sh status    say what is installed; exit 3 when not
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

find_tools() {
    CHROMIUM="$(command -v chromium || true)"
    CHROMEDRIVER="$(command -v chromedriver || true)"
    [[ -n $CHROMIUM && -n $CHROMEDRIVER ]]
}

versions() {
    echo "chromium: installed ($("$CHROMIUM" --version 2>/dev/null | head -n 1);" \
        "$("$CHROMEDRIVER" --version 2>/dev/null | head -n 1 | cut -d' ' -f1-2))"
}

cmd_install() {
    if ! find_tools; then
        command -v chromium >/dev/null || apt_install chromium
        command -v chromedriver >/dev/null || apt_install chromium-driver
        find_tools || die "chromium/chromedriver installed but not on PATH"
    fi
    # Without any font, every screenshot shows empty boxes instead of text.
    if command -v fc-list >/dev/null && [[ -z "$(fc-list 2>/dev/null | head -n 1)" ]]; then
        apt_install fonts-dejavu-core
    fi
    versions
}

cmd_status() {
    if find_tools; then
        versions
    else
        echo "chromium: not installed (run: $0 install)"
        return 3
    fi
}

case "${1:-}" in
install) cmd_install ;;
status) cmd_status ;;
*)
    echo "usage: $0 {install|status}" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Build the Debian package: the binary, the systemd units, man pages and completions
# generated from the binary itself (so they match its flags), the ssh_config and
# authorized_keys examples.
#
#   bash contrib/deb/build.sh                 # release build, then target/debian/malai_*.deb
#   bash contrib/deb/build.sh --no-build      # package the release binary already built
#   MALAI_DEB_BINARY=<file> bash contrib/deb/build.sh --no-build --fast -o <dir>
#                                             # package that binary (the tests use the debug
#                                             # build: a release build is minutes on 2 cores)
#
# Any other arguments are passed to `cargo deb`. Needs cargo-deb
# (`cargo install --locked cargo-deb`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

build=1
args=()
for a in "$@"; do
    case "$a" in
        --no-build) build=0 ;;
        *) args+=("$a") ;;
    esac
done

target="${CARGO_TARGET_DIR:-target}"
if [ "$build" = 1 ]; then
    cargo build --release --locked
fi
if [ -n "${MALAI_DEB_BINARY:-}" ]; then
    # cargo-deb takes the binary from <target>/release: stage a stripped copy of the given
    # one in a target dir of its own, never over a real release build.
    target="$target/deb-staging"
    mkdir -p "$target/release"
    strip -o "$target/release/malai" "$MALAI_DEB_BINARY" 2>/dev/null ||
        cp "$MALAI_DEB_BINARY" "$target/release/malai"
    export CARGO_TARGET_DIR="$target"
fi
out="$target/release"
bin="$out/malai"
[ -x "$bin" ] || { echo "contrib/deb/build.sh: no binary at $bin (build it, or drop --no-build)" >&2; exit 1; }

assets="$out/deb-assets"
rm -rf "$assets"
mkdir -p "$assets/completions"
"$bin" ssh man "$assets/man" 2>/dev/null
gzip -9n "$assets"/man/*.1
"$bin" ssh completions bash >"$assets/completions/malai"
"$bin" ssh completions zsh >"$assets/completions/_malai"
"$bin" ssh completions fish >"$assets/completions/malai.fish"

exec cargo deb --no-build --no-strip "${args[@]}"

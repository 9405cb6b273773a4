#!/usr/bin/env bash
# The OHIF v3 viewer the tests (and `make demo`) serve against Orthanc's DICOMweb: the prebuilt
# @ohif/app from the npm registry, pinned by version and checksum, unpacked under var/ohif/.
# Idempotent: does nothing when that build is already there. Needs npm (Debian package npm).
set -euo pipefail
VERSION=3.13.2
SHA1=26a51ffcc1704c30fff403258a1d7392e9a991f3   # `npm pack` shasum of @ohif/app@3.13.2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/var/ohif/$VERSION"
[ -f "$DEST/dist/index.html" ] && exit 0
command -v npm >/dev/null || { echo "npm is not installed (Debian package npm)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
tarball="$tmp/ohif-app-$VERSION.tgz"
echo "$SHA1  $tarball" | sha1sum -c --quiet -
mkdir -p "$DEST"
tar -xzf "$tarball" -C "$tmp"
rm -rf "$DEST/dist"
mv "$tmp/package/dist" "$DEST/dist"
echo "OHIF $VERSION in $DEST/dist"

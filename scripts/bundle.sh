#!/usr/bin/env bash
# make bundle: one archive with everything an air-gapped site needs to install Portico with no network.
#
#   scripts/bundle.sh PYTHON OUT.tar.gz
#
#   portico-bundle/src/      this checkout (tracked and untracked, not ignored files): Makefile, scripts,
#                            Orthanc config, and the model packages under src/models/
#   portico-bundle/wheels/   every Python wheel: Portico's dependencies with BUNDLE_EXTRAS, the CPU build of
#                            torch when an extra needs it, pip and setuptools (for the editable install)
#   portico-bundle/debs/     the Debian packages (install-system.sh --list, or BUNDLE_DEBS) with every
#                            dependency, and a Packages index: a flat apt repository
#   portico-bundle/MANIFEST  what is in it, where from, when
#
# Made on a machine of the same Debian release and architecture, and Python minor version, as the site.
# Install it there with `make install-offline BUNDLE=...` (scripts/install-offline.sh).
set -euo pipefail
PY=${1:?usage: bundle.sh PYTHON OUT.tar.gz}
out=${2:?usage: bundle.sh PYTHON OUT.tar.gz}
here=$(cd "$(dirname "$0")/.." && pwd)
extras=${BUNDLE_EXTRAS-train,fl}
debs=${BUNDLE_DEBS-$("$here/scripts/install-system.sh" --list)}

stage=$(mktemp -d "${TMPDIR:-/tmp}/portico-bundle.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/portico-bundle
mkdir -p "$root/src" "$root/wheels" "$root/debs"

echo "== bundle 1/4: the source and model packages"
(cd "$here" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$root/src"

echo "== bundle 2/4: Python wheels (extras: ${extras:-none})"
"$PY" -m pip download -q --dest "$root/wheels" pip "setuptools>=77" wheel
if [[ ",$extras," =~ ,(train|fl), ]]; then
  TORCH_VERSION=${TORCH_VERSION:-2.13.0} "$here/scripts/install-torch.sh" "$PY" --download "$root/wheels"
fi
# pip wheel, not download: a dependency published only as a source archive is built here, not at the site
spec="$root/src"
[ -z "$extras" ] || spec="$root/src[$extras]"
"$PY" -m pip wheel --wheel-dir "$root/wheels" --find-links "$root/wheels" "$spec"
# the site installs src/ itself (editable, as make venv does); drop what building it here left in src/
rm -rf "$root"/wheels/portico-*.whl "$root/src/build" "$root"/src/*.egg-info

if [ -n "$debs" ]; then
  echo "== bundle 3/4: Debian packages and their dependencies: $debs"
  # shellcheck disable=SC2086  # a list of package names
  closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances $debs | grep -v '^ ' | grep -v '[<>]' | sort -u)
  # shellcheck disable=SC2086
  (cd "$root/debs" && apt-get download -q $closure 2>&1 | grep -v 'unsandboxed as root' || true)
  [ "$(find "$root/debs" -name '*.deb' | wc -l)" -gt 0 ] || { echo "no Debian package downloaded" >&2; exit 1; }
  (cd "$root/debs" && for f in *.deb; do
     dpkg-deb -f "$f"
     printf 'Filename: ./%s\nSize: %s\nSHA256: %s\n\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
   done > Packages)
else
  echo "== bundle 3/4: no Debian packages (BUNDLE_DEBS is empty)"
fi

echo "== bundle 4/4: the archive"
{
  echo "Portico offline bundle, made $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release && echo "$PRETTY_NAME") $(uname -m)"
  echo "source: $(cd "$here" && git describe --always --dirty 2>/dev/null || echo unknown)"
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0])'); extras: ${extras:-none}"
  echo "debian packages: ${debs:-none}"
  echo "wheels: $(find "$root/wheels" -name '*.whl' | wc -l); debs: $(find "$root/debs" -name '*.deb' | wc -l)"
  echo "install: tar -xzf $(basename "$out") && cd portico-bundle/src && make install-offline BUNDLE=.."
} > "$root/MANIFEST"
mkdir -p "$(dirname "$out")"
tar -czf "$out" -C "$stage" portico-bundle
echo "bundle: $out ($(du -h "$out" | cut -f1))"

#!/usr/bin/env bash
# make install-offline: install Portico from a bundle (scripts/bundle.sh) with no network at all.
#
#   scripts/install-offline.sh BUNDLE [--venv DIR] [--no-system]
#
# BUNDLE is the archive or its unpacked portico-bundle folder. The Debian packages come from the bundle's
# debs/ folder as a flat apt repository (install-system.sh with APT_OPTS; nothing else is asked), the
# Python packages from its wheels/ with pip --no-index. Portico itself is this checkout, installed
# editable into the venv as `make venv` does, so that `make demo` (and `make test` when the bundle has the
# train, dev and fl extras) find everything installed and download nothing.
set -euo pipefail
bundle=${1:?usage: install-offline.sh BUNDLE [--venv DIR] [--no-system]}
shift
venv=.venv
system=1
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv=$2; shift 2 ;;
    --no-system) system=""; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")/.." && pwd)

if [ -f "$bundle" ]; then
  unpacked=$(mktemp -d "${TMPDIR:-/tmp}/portico-offline.XXXXXX")
  trap 'rm -rf "$unpacked"' EXIT
  echo "== offline: unpacking $bundle"
  tar -xzf "$bundle" -C "$unpacked"
  root=$unpacked/portico-bundle
elif [ -d "$bundle/portico-bundle" ]; then
  root=$(cd "$bundle/portico-bundle" && pwd)
else
  root=$(cd "$bundle" && pwd)
fi
[ -d "$root/wheels" ] || { echo "$bundle is not a Portico bundle (no wheels/)" >&2; exit 1; }
cat "$root/MANIFEST" 2>/dev/null || true

if [ -n "$system" ] && [ -f "$root/debs/Packages" ]; then
  echo "== offline: Debian packages from $root/debs"
  apt_dir=$(mktemp -d "${TMPDIR:-/tmp}/portico-apt.XXXXXX")
  mkdir -p "$apt_dir/lists/partial"
  echo "deb [trusted=yes] file:$root/debs ./" > "$apt_dir/sources.list"
  # the bundle sits in private temporary folders: apt reads them as root, not as its _apt user
  # only the bundle's repository, with its own lists: the site's sources and lists stay as they are
  APT_OPTS="-o Dir::Etc::SourceList=$apt_dir/sources.list -o Dir::Etc::SourceParts=/dev/null \
-o Dir::State::Lists=$apt_dir/lists -o APT::Get::List-Cleanup=0 -o Dir::Cache::pkgcache= \
-o Dir::Cache::srcpkgcache= -o APT::Sandbox::User=root" "$here/scripts/install-system.sh"
  rm -rf "$apt_dir"
fi

echo "== offline: Python packages from $root/wheels into $venv"
extras=$(sed -n 's/.*extras: //p' "$root/MANIFEST" 2>/dev/null || true)
[ "$extras" != none ] || extras=""
test -x "$venv/bin/python" || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --no-index --find-links "$root/wheels")
"${pip[@]}" --upgrade pip
spec="$here"
[ -z "$extras" ] || spec="$here[$extras]"
"${pip[@]}" -e "$spec"
# what make venv / venv-full would otherwise try to download
touch "$venv/.installed"
if [[ ",$extras," == *,train,* && ",$extras," == *,dev,* && ",$extras," == *,fl,* ]]; then
  touch "$venv/.installed-full"
fi
echo "installed from $bundle: make demo runs with no network"

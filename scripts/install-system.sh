#!/usr/bin/env bash
# Install the Debian packages Portico needs when they are missing (sudo when not root), then make sure
# Debian's own Orthanc and Prometheus services stay off: Portico (and its tests) start their own, and a stray
# one holds port 8042 (Orthanc) or 9090 (Prometheus).
#
#   scripts/install-system.sh            install what is missing
#   scripts/install-system.sh --list     print every package Portico needs (make bundle downloads them)
#   scripts/install-system.sh --fl-user [NAME]
#                                        create the unprivileged user NVFlare runs as when Portico runs as
#                                        root (fl.run_as, default portico-fl; docs/fl.md), if missing
#
# APT_OPTS adds options to apt-get (make install-offline points it at the bundle's folder).
# For tests: PORTICO_POLICY_RC_D replaces /usr/sbin/policy-rc.d, PORTICO_NEED the list of missing packages.
set -euo pipefail
ALL=(orthanc orthanc-dicomweb dcmtk dicom3tools chromium python3-venv rsyslog rsyslog-gnutls postgresql prometheus)
if [ "${1:-}" = "--list" ]; then
  echo "${ALL[*]}"
  exit 0
fi
if [ "${1:-}" = "--fl-user" ]; then
  name=${2:-portico-fl}
  if id -u "$name" >/dev/null 2>&1; then
    echo "FL user $name exists"
  else
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$name"
    echo "created FL user $name (NVFlare runs as it when Portico runs as root)"
  fi
  exit 0
fi

need=()
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescu >/dev/null || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v chromium >/dev/null || need+=(chromium)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# a real syslog collector for the ATNA audit tests (imtcp/imudp, and gtls for RFC 5425 TLS)
[ -x /usr/sbin/rsyslogd ] || need+=(rsyslog)
compgen -G '/usr/lib/*/rsyslog/lmnsd_gtls.so' >/dev/null || need+=(rsyslog-gnutls)
# a real Prometheus for the metrics test (it starts its own on a free port, with a temporary configuration)
command -v prometheus >/dev/null || need+=(prometheus)
# PostgreSQL for the several-machines set-up's tests (they start their own server in a temporary folder)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
if [ -n "${PORTICO_NEED+set}" ]; then read -r -a need <<<"$PORTICO_NEED"; fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
policy=${PORTICO_POLICY_RC_D:-/usr/sbin/policy-rc.d}
marker="# portico: install-system.sh (removed when apt is done)"

# A package's Debian service: disabled (and stopped) and masked, so neither a reboot nor an upgrade starts it.
# Without systemd (containers) there is nothing to stop; masking still writes the link, and sysv is disabled.
quiet_service() {  # PACKAGE WHY
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed' || return 0
  if command -v systemctl >/dev/null; then
    [ "$(systemctl is-enabled "$1.service" 2>/dev/null || true)" = masked ] && return 0
    echo "disabling and masking Debian's $1 service ($2)"
    if [ -d /run/systemd/system ]; then
      $SUDO systemctl disable --now --quiet "$1.service" 2>/dev/null || true
    else
      $SUDO systemctl disable --quiet "$1.service" 2>/dev/null || true
    fi
    $SUDO systemctl mask --quiet "$1.service" || echo "warning: could not mask $1.service" >&2
  elif [ -x "/etc/init.d/$1" ] && command -v update-rc.d >/dev/null; then
    $SUDO update-rc.d "$1" disable >/dev/null 2>&1 || true
  fi
}
quiet_services() {
  quiet_service orthanc "Portico starts its own Orthanc; a stray one holds port 8042"
  quiet_service prometheus "the site's monitoring runs its own Prometheus, the tests theirs; a stray one holds port 9090"
}

if [ ${#need[@]} -eq 0 ]; then
  quiet_services
  exit 0
fi
echo "== installing Debian packages: ${need[*]} (apt prints each one as it goes)"
export DEBIAN_FRONTEND=noninteractive

# The packages' own services must not start while they install. policy-rc.d says so, but only ours: an
# existing one (the site's, a container image's) is left exactly as it is, and ours is removed whatever
# happens, apt failing included.
ours=""
remove_ours() {
  if [ -n "$ours" ] && [ "$(sed -n 2p "$policy" 2>/dev/null)" = "$marker" ]; then $SUDO rm -f "$policy"; fi
}
trap remove_ours EXIT
if [ -e "$policy" ] || [ -L "$policy" ]; then
  echo "keeping the existing $policy (services may start during the install; orthanc's and prometheus's are stopped after)"
else
  printf '#!/bin/sh\n%s\nexit 101\n' "$marker" | $SUDO tee "$policy" >/dev/null
  ours=1
  $SUDO chmod 755 "$policy"
fi

# shellcheck disable=SC2086  # APT_OPTS is a list of options
$SUDO apt-get update -q ${APT_OPTS:-}
# shellcheck disable=SC2086
$SUDO apt-get install -y -q --no-install-recommends ${APT_OPTS:-} "${need[@]}"
remove_ours
ours=""
quiet_services
# policy-rc.d stops a start now, not the enabling at boot: rsyslog, when we installed it, runs only in tests
if [[ " ${need[*]} " == *" rsyslog "* ]] && command -v systemctl >/dev/null; then
  $SUDO systemctl disable --quiet rsyslog.service 2>/dev/null || true
fi
# and Debian's PostgreSQL cluster: a site that uses PostgreSQL runs its own, configured server
if [[ " ${need[*]} " == *" postgresql "* ]] && command -v systemctl >/dev/null; then
  $SUDO systemctl disable --quiet postgresql.service 2>/dev/null || true
fi

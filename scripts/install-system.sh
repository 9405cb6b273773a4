#!/usr/bin/env bash
# Install the Debian packages Portico needs when they are missing (sudo when not root).
set -euo pipefail
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
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# the packages' own services must not start: Portico starts Orthanc itself, on its own ports
echo exit 101 | $SUDO tee /usr/sbin/policy-rc.d >/dev/null; $SUDO chmod +x /usr/sbin/policy-rc.d
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
$SUDO rm -f /usr/sbin/policy-rc.d
# policy-rc.d stops a start now, not the enabling at boot: rsyslog, when we installed it, runs only in tests
if [[ " ${need[*]} " == *" rsyslog "* ]] && command -v systemctl >/dev/null; then
  $SUDO systemctl disable --quiet rsyslog.service 2>/dev/null || true
fi

#!/usr/bin/env bash
# Install the CPU build of torch into a virtual environment, before anything that depends on torch: a plain
# `pip install torch` on Linux resolves to the CUDA build and about 20 `nvidia-*` packages (several GB).
#
#   scripts/install-torch.sh PYTHON [PIP_ARGS...]        pip install (PIP_ARGS as they are, e.g.
#                                                       `--dry-run --ignore-installed --report plan.json`)
#   scripts/install-torch.sh PYTHON --download DIR       pip download the wheels into DIR (make bundle)
#
# PyTorch's CPU wheel index is used when it answers within a few seconds; otherwise the index pip is
# configured with (a mirror, a local wheel folder) -- and when that one would give the CUDA build, the
# install is refused with a message rather than downloading several GB (PORTICO_ALLOW_CUDA_TORCH=1 allows it).
# Environment: TORCH_VERSION (2.13.0), PORTICO_TORCH_INDEX (https://download.pytorch.org/whl/cpu; set it
# empty to skip the probe and use pip's own index).
set -euo pipefail
PY=${1:?usage: install-torch.sh PYTHON [--download DIR | PIP_ARGS...]}
shift
version=${TORCH_VERSION:-2.13.0}
index=${PORTICO_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
action=(install)
if [ "${1:-}" = "--download" ]; then
  action=(download --dest "${2:?--download DIR}")
  shift 2
fi

if [ "${action[0]}" = install ] && [ $# -eq 0 ] && "$PY" - "$version" <<'EOF' 2>/dev/null; then
import importlib.metadata as m, sys
v = m.version("torch")
cuda = [d.metadata["Name"] for d in m.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-")]
sys.exit(0 if v.split("+")[0] == sys.argv[1] and not cuda else 1)
EOF
  echo "torch $version (CPU) already installed"
  exit 0
fi

# the probe: an HTTP answer within 5 s (timeout also bounds a hanging DNS look-up on a closed network)
answers() {
  [ -n "$1" ] && timeout 8 "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
EOF
}

if answers "$index"; then
  echo "torch $version: the CPU build from $index"
  # the CPU index also carries torch's own dependencies (filelock, sympy, networkx, jinja2, fsspec, ...)
  exec "$PY" -m pip "${action[@]}" --index-url "$index" "$@" "torch==$version"
fi
echo "torch $version: ${index:-(no CPU index set)} does not answer; from pip's configured index"
if [ $# -eq 0 ] && [ -z "${PORTICO_ALLOW_CUDA_TORCH:-}" ]; then
  # refuse the CUDA build rather than download several GB of it for a machine that trains on the CPU
  plan=$(mktemp)
  trap 'rm -f "$plan"' EXIT
  "$PY" -m pip install -q --dry-run --ignore-installed --report "$plan" "torch==$version"
  cuda=$("$PY" -c '
import json, sys
names = [i["metadata"]["name"] for i in json.load(open(sys.argv[1]))["install"]]
print(" ".join(n for n in names if n.lower().startswith("nvidia-")))' "$plan")
  if [ -n "$cuda" ]; then
    echo "refusing: pip's index resolves torch==$version to the CUDA build ($cuda)." >&2
    echo "Point PORTICO_TORCH_INDEX at a reachable CPU wheel index or mirror, or set PORTICO_ALLOW_CUDA_TORCH=1." >&2
    exit 1
  fi
  "$PY" -m pip "${action[@]}" "torch==$version"
  exit
fi
exec "$PY" -m pip "${action[@]}" "$@" "torch==$version"

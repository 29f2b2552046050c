#!/usr/bin/env bash
# Build one side virtual environment per quality peer under benchmarks/peers/.venvs/<peer> (git-ignored by
# the .gitignore this script writes inside .venvs/).
# Their pins conflict with fxpress's (llm-compressor 0.14 wants transformers <= 5.17), so each gets its own.
# torch is pinned to 2.13.0 so pip takes the local CPU wheel instead of GBs of CUDA wheels.
#   bash benchmarks/peers/build_quality_peers.sh                 # all peers
#   bash benchmarks/peers/build_quality_peers.sh hqq quanto      # some
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
declare -A PACKAGES=(
  [llmcompressor]="llmcompressor==0.14.0.1"
  [hqq]="hqq==0.2.8.post1 transformers accelerate"
  [quanto]="optimum-quanto==0.2.7 transformers accelerate"
  [brevitas]="brevitas[llm]==0.13.4 transformers accelerate"
)
mkdir -p "$here/.venvs" && echo '*' > "$here/.venvs/.gitignore"  # git ignores the whole folder
peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=(llmcompressor hqq quanto brevitas)
for peer in "${peers[@]}"; do
  [ -n "${PACKAGES[$peer]:-}" ] || { echo "unknown peer '$peer': choose from ${!PACKAGES[*]}" >&2; exit 2; }
  venv="$here/.venvs/$peer"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  # shellcheck disable=SC2086  # the package list is meant to split
  "$venv/bin/pip" install -q torch==2.13.0 ${PACKAGES[$peer]}
  echo "$peer: $("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
done

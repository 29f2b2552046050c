#!/usr/bin/env bash
# The ONNX Runtime GenAI model builder's int4 CPU model of SmolLM2-135M-Instruct, built in a side venv.
#
#   benchmarks/peers/build_genai.sh [OUT_DIR]      (default: benchmarks/peers/models/smollm2-genai-int4)
#
# The side venv (benchmarks/peers/.venvs/genai, ignored by git) holds onnxruntime-genai 0.18.0; the builder's
# other dependencies (torch, transformers, onnx, onnx_ir, onnxruntime, tqdm) are the project venv's, reached by
# a .pth file, so torch is not downloaded twice. The Hugging Face folder the builder reads is the one fxpress
# converts from the embedded GGUF (fxpress.models.resolve_model_path("smollm2"): config, safetensors, tokenizer).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PROJECT_PY="${PROJECT_PY:-$ROOT/.venv/bin/python}"
VENV="$HERE/.venvs/genai"
OUT="${1:-$HERE/models/smollm2-genai-int4}"

if [ ! -x "$VENV/bin/python" ]; then
    "$("$PROJECT_PY" -c 'import sys; print(sys._base_executable)')" -m venv "$VENV"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PROJECT_PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("site-packages")))' > "$SITE/project_deps.pth"
"$VENV/bin/python" -c 'import onnxruntime_genai' 2>/dev/null || "$VENV/bin/pip" install -q --no-deps onnxruntime-genai==0.18.0

HF_DIR="$("$PROJECT_PY" -c 'from fxpress.models import resolve_model_path; print(resolve_model_path("smollm2"))')"
mkdir -p "$(dirname "$OUT")"
STAGE="$OUT.partial"
rm -rf "$STAGE"
start=$(date +%s.%N)
"$VENV/bin/python" -m onnxruntime_genai.models.builder -i "$HF_DIR" -o "$STAGE" -p int4 -e cpu -c "$STAGE.cache"
end=$(date +%s.%N)
rm -rf "$STAGE.cache" "$OUT"
mv "$STAGE" "$OUT"
echo "built $OUT in $(echo "$end - $start" | bc) s (load average: $(cut -d' ' -f1-3 /proc/loadavg))"

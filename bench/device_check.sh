#!/usr/bin/env bash
# The CUDA checks, for a GPU machine (CI has none), from the repository root, with no install:
#   tests  the CUDA tests (tests/test_cuda.py, the switching test on CUDA)
#   bench  `bench switch --device cuda` on the tiny models and two models of real shapes
#          (Qwen2.5-0.5B, Llama-3.2-1B) with random weights, in bfloat16
#   serve  `tokenpool serve --device cuda` and `tokenpool up --device cuda` (proxy, prefill, decode,
#          kvtransfer processes) serving tiny models and the Qwen2.5-0.5B shape; requests through
#          `tokenpool generate --server`, switching models between them
#   vllm   the vLLM backend (--engine vllm; needs vllm==0.32.0, the CUDA build, importable, e.g. from
#          .whl/): its conformance test, `bench switch --engine vllm --device cuda` on the tiny models
#          and the Qwen2.5-0.5B shape, and `tokenpool serve --engine vllm` answering switching requests.
#          Written without a GPU to run it on: nothing of the backend's CUDA path has run yet.
# PHASES picks some (default all). Results under ${OUT:-out/cuda}. Packages the machine lacks (or
# has too old) come from wheels in .whl/ (pip download --python-version of that machine).
set -uo pipefail
OUT=${OUT:-out/cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ns=$(mktemp -d) && mkdir "$ns/tokenpool"  # the folders under the tokenpool namespace, as pyproject maps them
for d in engine bench cli proxy prefill_svc decode_svc kvtransfer protos telemetry compose; do
  ln -s "$PWD/$d" "$ns/tokenpool/$d"
done
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$ns/site" .whl/*.whl || exit 1
  export PYTHONPATH="$ns/site"
fi
export PYTHONPATH="$ns${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
df -h /dev/shm | tail -1 | tee -a "$OUT/gpu.txt"

PHASES=${PHASES:-tests bench serve vllm}
DEVICE=${DEVICE:-cuda}  # cpu tries the bench and serve phases where there is no GPU
want() { [[ " $PHASES " == *" $1 "* ]]; }
models=/tmp/cuda-check-models

if want tests; then
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -k cuda -o addopts="" \
  tests/test_cuda.py tests/test_model_switching.py 2>&1 | tee "$OUT/pytest.txt" | tail -40
echo "pytest exit ${PIPESTATUS[0]}"
fi

write_models() {  # the tiny models and two real shapes (their configs, random weights), once
python3 - "$models" <<'PY'
import dataclasses, sys, time
from pathlib import Path
from tokenpool.engine.tiny_models import TINY_MODEL_SPECS, make_model, make_tiny_models

root, start = Path(sys.argv[1]), time.perf_counter()
llama, qwen = TINY_MODEL_SPECS[0], TINY_MODEL_SPECS[1]
shapes = [  # tokenizer random too (vocab rows past its 512 tokens zero): only the bytes matter here
    dataclasses.replace(qwen, name="qwen2.5-0.5b-shape", vocab_size=151936, hidden_size=896,
                        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2, head_dim=64, max_position_embeddings=32768),
    dataclasses.replace(llama, name="llama-3.2-1b-shape", vocab_size=128256, hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                        tie_word_embeddings=True),
]
if not all((root / spec.name).is_dir() for spec in TINY_MODEL_SPECS):
    make_tiny_models(root)
for spec in shapes:
    if not (root / spec.name).is_dir():
        make_model(spec, root)
print(f"models ready in {time.perf_counter() - start:.0f} s", flush=True)
PY
}

if want bench; then
write_models || exit 1
timeout "${BENCH_TIMEOUT:-360}" python3 - "$OUT" "$models" "$DEVICE" <<'PY' 2>&1 | tee "$OUT/bench.txt"
import argparse, sys
from pathlib import Path
from tokenpool.bench import switch_bench
from tokenpool.engine.tiny_models import TINY_MODEL_SPECS

out, root, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
names = [spec.name for spec in TINY_MODEL_SPECS] + ["qwen2.5-0.5b-shape", "llama-3.2-1b-shape"]
switch_bench.run(argparse.Namespace(models=[str(root / n) for n in names], json=out / f"switch-{device}.json",
                                    dtype="bfloat16", device=device))
PY
echo "bench exit ${PIPESTATUS[0]}"
fi

if want serve; then
write_models || exit 1
serve_models=()
for m in tiny-llama tiny-qwen2 tiny-qwen3 qwen2.5-0.5b-shape; do serve_models+=("--model=$m=$models/$m"); done
stop() {  # SIGINT, then SIGKILL after 20 s
  kill -INT "$1"; for _ in $(seq 20); do kill -0 "$1" 2>/dev/null || break; sleep 1; done
  kill -9 "$1" 2>/dev/null; wait "$1"
}
ask() {  # ask ADDR LABEL: requests that switch models, each streamed back
  for m in tiny-llama qwen2.5-0.5b-shape tiny-qwen3 qwen2.5-0.5b-shape tiny-qwen2 tiny-llama; do
    echo "== $2: $m"
    timeout 120 python3 -m tokenpool.cli.main generate --server "$1" --model "$m" --max-tokens 24 \
      "The quick brown fox" 2>&1 | tail -2
  done
}
python3 -m tokenpool.cli.main serve --device "$DEVICE" --dtype bfloat16 --port 0 "${serve_models[@]}" \
  > "$OUT/serve.log" 2>&1 &
pid=$!
for _ in $(seq 120); do grep -q "serving .* on" "$OUT/serve.log" && break; sleep 1; done
addr=$(grep -o "on [^ ]*:[0-9]*" "$OUT/serve.log" | head -1 | cut -d' ' -f2)
echo "serve at ${addr:-nowhere}"; tail -3 "$OUT/serve.log"
[ -n "$addr" ] && ask "$addr" serve 2>&1 | tee "$OUT/serve-requests.txt"
stop $pid
python3 -m tokenpool.cli.main up --device "$DEVICE" --dtype bfloat16 --port 0 --decode 1 \
  --log-dir "$OUT/up-logs" "${serve_models[@]}" > "$OUT/up.log" 2>&1 &
pid=$!
for _ in $(seq 180); do grep -q "stack up\|error" "$OUT/up.log" && break; sleep 1; done
tail -5 "$OUT/up.log"
addr=$(grep -o "connect to [^ ]*" "$OUT/up.log" | head -1 | cut -d' ' -f3)
[ -n "$addr" ] && ask "$addr" up 2>&1 | tee "$OUT/up-requests.txt"
stop $pid
tail -3 "$OUT/up.log"
fi

if want vllm; then
if ! python3 -c "import vllm" 2>/dev/null; then
  echo "vllm phase skipped: vllm is not importable here (pip download vllm==0.32.0 wheels into .whl/)"
else
write_models || exit 1
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_vllm_backend.py -k pinned 2>&1 | tee "$OUT/vllm-pytest.txt" | tail -20
echo "vllm pytest exit ${PIPESTATUS[0]}"
timeout "${BENCH_TIMEOUT:-360}" python3 -m tokenpool.cli.main bench switch --engine vllm --device "$DEVICE" \
  --dtype bfloat16 --json "$OUT/switch-vllm-$DEVICE.json" \
  --models "$models/tiny-qwen3" "$models/tiny-mistral" "$models/qwen2.5-0.5b-shape" 2>&1 | tee "$OUT/vllm-bench.txt"
echo "vllm bench exit ${PIPESTATUS[0]}"
vllm_models=()
for m in tiny-qwen3 tiny-mistral qwen2.5-0.5b-shape; do vllm_models+=("--model=$m=$models/$m"); done
python3 -m tokenpool.cli.main serve --engine vllm --device "$DEVICE" --dtype bfloat16 --port 0 \
  "${vllm_models[@]}" > "$OUT/vllm-serve.log" 2>&1 &
pid=$!
for _ in $(seq 240); do grep -q "serving .* on" "$OUT/vllm-serve.log" && break; sleep 1; done
addr=$(grep -o "on [^ ]*:[0-9]*" "$OUT/vllm-serve.log" | head -1 | cut -d' ' -f2)
echo "vllm serve at ${addr:-nowhere}"; tail -3 "$OUT/vllm-serve.log"
if [ -n "$addr" ]; then
  for m in tiny-qwen3 qwen2.5-0.5b-shape tiny-mistral qwen2.5-0.5b-shape; do
    echo "== vllm: $m"
    timeout 120 python3 -m tokenpool.cli.main generate --server "$addr" --model "$m" --max-tokens 24 \
      "The quick brown fox" 2>&1 | tail -2
  done 2>&1 | tee "$OUT/vllm-serve-requests.txt"
fi
kill -INT $pid; sleep 10; kill -9 $pid 2>/dev/null; wait $pid
fi
fi

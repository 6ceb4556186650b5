#!/usr/bin/env bash
# One lent GPU's prepared run (benchmarks/README.md, "The prepared command"): the server's default path started
# twice (a fresh start, then a warm restart with the compile cache the first saved), then device_check's parts that
# the default path does not already measure, within what is left of LIMIT_S seconds. Logs and JSON go to $OUT.
#   bash benchmarks/device_session.sh                  # on the GPU machine, wheels in .whl (the device tool's carry)
#   SMALL=1 OUT=/tmp/out bash benchmarks/device_session.sh   # the same steps on the tiny preset, on a CPU
# STEPS_START / STEPS_RESTART (4) and TIMEOUT_START_S / TIMEOUT_RESTART_S (200) size the two starts' requests.
set -uo pipefail
started=$(date +%s)
limit="${LIMIT_S:-560}"
out="${OUT:?OUT: where logs and results go}"
py="${PYTHON:-python3}"
small=()
[ "${SMALL:-0}" = 1 ] && small=(--small)
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ "${SMALL:-0}" != 1 ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH="$PWD:/tmp/site"
fi
quiet() { grep -v -e "Attention backends are an experimental" -e "CLIPImageProcessor. requires torchvision"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__)"; } 2>&1 | tee "$out/machine.txt"
data=/tmp/particalize-device-session
rm -rf "$data"
for label in start restart; do  # a fresh inductor cache each: the restart finds only what the compile cache holds
  steps_var="STEPS_${label^^}" timeout_var="TIMEOUT_${label^^}_S"
  TORCHINDUCTOR_CACHE_DIR="/tmp/inductor-$label" TRITON_CACHE_DIR="/tmp/triton-$label" \
    timeout "${!timeout_var:-200}" "$py" -m benchmarks.default_path "${small[@]}" --data-dir "$data" \
    --label "$label" --steps "${!steps_var:-4}" --out "$out/default-path-$label.json" 2>&1 | quiet \
    | tee "$out/default-path-$label.log"
done
budget=$(( limit - ($(date +%s) - started) - 45 ))
echo "device_check budget: ${budget} s"
[ "$budget" -gt 60 ] || exit 0
timeout $(( budget + 40 )) "$py" -m benchmarks.device_check "${small[@]}" --budget-s "$budget" \
  --skip "${SKIP:-eager_step,attention,warm_restart,default_step,vae_decode,text_encoder_cpu_encode}" \
  --out "$out/device-check-cuda.json" 2>&1 | quiet | tee "$out/device-check.log"
echo "session: $(( $(date +%s) - started )) s"

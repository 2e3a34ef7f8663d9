# Sourced by run_gpu.sh and run_gpu_flow.sh from the repo root: wheels from .whl/ (if there) into /tmp/site, offline
# Hub and datasets, and $stamp / $gpu for the result file names.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
stamp=$(date -u +%Y-%m-%d)
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else 'cpu')")

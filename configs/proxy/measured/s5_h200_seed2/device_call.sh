# device call (nvidia-h200, one H200; carry [".whl", ".data/proxy-cl.npz", ".data/backbones"]): seed 2 of the whole
# proxy study, 3 learners x (teacher + 7 methods), eight runs at a time on GPU 0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/proxy_device_call.sh 2 8 380

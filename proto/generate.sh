#!/usr/bin/env bash
# Regenerate Python code for every proto/*.proto into proto/ (messages, stubs, .pyi type stubs).
#
# Inside a .proto, import a sibling as `import "other.proto";`. protoc then writes bare
# `import other_pb2`; this script rewrites those to `from proto import other_pb2` so the
# generated modules import as part of the `proto` package.
#
# Pinned generator: grpcio-tools==1.84.0 (libprotoc 35.1 -> Python gencode 7.35.1). Generated code refuses
# runtimes older than its generator: kv_transfer_pb2_grpc.py needs grpcio>=1.84.0 (the GPU image has exactly
# 1.84.0, so do NOT regenerate with 1.84.1+), *_pb2.py needs protobuf>=7.35.1,<8 (GPU image: 7.36.2).
# Usage: proto/generate.sh   (PYTHON=/path/to/python to pick the interpreter; default .venv/bin/python)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
cd "$root"

shopt -s nullglob
protos=(proto/*.proto)
if [ ${#protos[@]} -eq 0 ]; then
  echo "no proto/*.proto files" >&2
  exit 1
fi

"$python" -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto "${protos[@]}"

for f in proto/*_pb2.py proto/*_pb2.pyi proto/*_pb2_grpc.py; do
  sed -i -E 's/^import ([A-Za-z0-9_]+_pb2)( as |$)/from proto import \1\2/' "$f"
done
echo "generated: $(ls proto/*_pb2*.py* | tr '\n' ' ')"

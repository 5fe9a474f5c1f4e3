#!/bin/sh
# Regenerate sdlite_pb2.py / sdlite_pb2.pyi / sdlite_pb2_grpc.py from sdlite.proto.
# Run from anywhere with the serve extra installed (grpcio-tools pinned in pyproject.toml):
#     sh src/sdlite/serve/gen_proto.sh [python]
# The generated files are committed; grpcio-tools is only needed to run this script. The generated
# sdlite_pb2.py checks the protobuf runtime version at import: keep the pinned protobuf at least the
# version of the protoc bundled in grpcio-tools (the "Protobuf Python Version" line in sdlite_pb2.py).
set -eu
PY=${1:-python}
SRC=$(cd "$(dirname "$0")/../.." && pwd)   # .../src
cd "$SRC"
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. sdlite/serve/sdlite.proto
echo "generated in $SRC/sdlite/serve"

#!/usr/bin/env bash
# Fill the ignored folders a device call carries (docs/gpu.md "Carried to the device"), on this
# machine, from PyPI and ../shared: .whl (the packages the device image lacks, for its Python 3.12)
# and .benchmodel/shared (the tokenizers and stories260K the tests and benchmarks read; DeepSeek's
# tokenizer left out to stay under the 64 MiB a call carries). The generated gRPC code (tandem/v1,
# tandem/smg, tandem/ext_proc, openengine) comes from scripts/setup.sh. Idempotent.
#   bash benchmarks/device_carry.sh            then carry: .whl tandem/v1 tandem/smg tandem/ext_proc openengine .benchmodel
#   NIXL=1 bash benchmarks/device_carry.sh     also .nixlwhl (nixl-cu13 + nixl, ~56 MiB: a call of its own)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all:
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64)
mkdir -p .whl
# the versions pyproject.toml pins (llguidance, grpcio-*, OpenTelemetry) and their OpenTelemetry parts
"${PIP[@]}" -d .whl llguidance==1.9.1 grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 \
  grpcio-tools==1.84.0 opentelemetry-api==1.45.1 opentelemetry-sdk==1.45.1 \
  opentelemetry-instrumentation-grpc==0.66b1 opentelemetry-instrumentation-aiohttp-server==0.66b1 \
  opentelemetry-exporter-otlp-proto-grpc==1.45.1 opentelemetry-exporter-otlp-proto-http==1.45.1 \
  opentelemetry-instrumentation==0.66b1 opentelemetry-semantic-conventions==0.66b1 \
  opentelemetry-exporter-otlp-proto-common==1.45.1 opentelemetry-proto==1.45.1 opentelemetry-util-http==0.66b1
if [ ! -d .benchmodel/shared ]; then
  mkdir -p .benchmodel/shared
  cp -r ../shared/. .benchmodel/shared/
  rm -rf .benchmodel/shared/tokenizers/deepseek-v3
fi
if [ "${NIXL:-0}" = 1 ]; then
  mkdir -p .nixlwhl
  "${PIP[@]}" -d .nixlwhl nixl-cu13 nixl
fi
du -sh .whl .benchmodel ${NIXL:+.nixlwhl} 2>/dev/null
